"""Ray's helper processes end with the process that started them, however that process ends.

Ray runs its GCS, raylet, dashboard and runtime-env agents and its workers as descendants of the
process that calls `ray.init` (here: `medtune simulate` or `medtune benchmark sweep`). Two ways of
ending that process left them behind:

- after a SIGKILL the dashboard and runtime-env agents lingered for 60-70 s (measured on 2 cores,
  flwr 1.41, before this module), holding memory and the session's ports;
- a stop that called `ray.shutdown()` while Flower's simulation threads still waited in `ray.get`
  could make Ray's core worker end the whole process with status 1 instead of 130.

So the first simulation of a process starts one small watcher process. It keeps a list of the
simulation process's descendants, refreshed twice a second, and holds the read end of a pipe whose
write end only that process holds. When the process is gone (a normal exit, an error, a signal or a
SIGKILL: the kernel closes the pipe in every case) the watcher ends every helper it saw, and their
descendants. A stop therefore never calls into Ray: the command line prints its line and exits.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys

import psutil

POLL_SECONDS = 0.5  # how often the list of helpers is refreshed

_watcher: subprocess.Popen | None = None


def end_helpers_with_this_process() -> None:
    """Start this process's watcher (once): its helper processes end when it does."""
    global _watcher
    if _watcher is not None and _watcher.poll() is None:
        return
    # The pipe's write end stays in this process only (subprocess's pipes are not inherited by the
    # processes Ray starts), so its end of file means this process is gone.
    _watcher = subprocess.Popen(
        [sys.executable, "-m", "medtune.federation.helper_processes", str(os.getpid())],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )


def watch(parent_pid: int, pipe: int) -> None:
    """Until `pipe` closes, remember `parent_pid`'s descendants; then end them all."""
    me = os.getpid()
    seen: dict[int, psutil.Process] = {}
    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        return
    while True:
        try:
            if parent.status() == psutil.STATUS_ZOMBIE:  # killed, not yet reaped by its own parent
                break
            for child in parent.children(recursive=True):
                if child.pid != me:
                    seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        readable, _, _ = select.select([pipe], [], [], POLL_SECONDS)
        if readable and not os.read(pipe, 4096):
            break
    end(list(seen.values()))


def end(helpers: list[psutil.Process]) -> None:
    """SIGKILL every helper still running and its descendants.

    Their owner is gone, so nothing is left to shut down gently: Ray's own `ray stop --force` does
    the same. Files stay whole: ledgers, checkpoints and results are written by atomic rename.
    """
    everyone: dict[int, psutil.Process] = {}
    for helper in helpers:
        try:
            if helper.is_running():  # psutil compares start times: a reused pid is not the helper
                everyone.setdefault(helper.pid, helper)
                for child in helper.children(recursive=True):
                    everyone.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            continue
    everyone.pop(os.getpid(), None)
    for process in everyone.values():
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(everyone.values()), timeout=5)


if __name__ == "__main__":
    # Ctrl-C reaches the whole foreground process group, the watcher included; it must outlive the
    # simulation to do its work, and it ends by itself once the simulation's process is gone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    watch(int(sys.argv[1]), sys.stdin.fileno())
