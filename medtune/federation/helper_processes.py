"""Ray's helper processes end with the process that started them, however that process ends.

Ray runs its GCS, raylet, dashboard and runtime-env agents and its workers as descendants of the
process that calls `ray.init` (here: `medtune simulate` or `medtune benchmark sweep`). Two ways of
ending that process left them behind:

- after a SIGKILL the dashboard and runtime-env agents lingered for about a minute, holding memory
  and the session's ports;
- a stop that called `ray.shutdown()` while Flower's simulation threads still waited in `ray.get`
  could make Ray's core worker end the whole process with status 1 instead of 130.

So Ray is started inside `ray_helpers_marked()`: every process Ray starts inherits an environment
variable naming this process's watcher, a small process of its own session that holds the read end
of a pipe whose write end only this process holds. When this process is gone (a normal exit, an
error, a signal or a SIGKILL: the kernel closes the pipe in every case) the watcher ends every
process that carries its mark and everything below them (Ray's agents), and nothing else. A stop
therefore never calls into Ray: the command line prints its line and exits.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psutil

MARK = "MEDTUNE_RAY_HELPER_OF"  # environment variable Ray's processes inherit while Ray starts
POLL_SECONDS = 0.5  # how often the watcher refreshes its view of the marked processes

_watcher: tuple[subprocess.Popen, str] | None = None


@contextmanager
def ray_helpers_marked() -> Iterator[None]:
    """Processes started inside this block carry this process's mark and end when it does."""
    global _watcher
    if _watcher is None or _watcher[0].poll() is not None:
        token = f"{os.getpid()}-{uuid.uuid4().hex}"
        # Its own session: a Ctrl-C or a SIGTERM sent to this process group does not end the
        # watcher. The pipe's write end is not inherited by other processes, so its end of file
        # means this process is gone.
        process = subprocess.Popen(
            [sys.executable, "-m", "medtune.federation.helper_processes", token],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        _watcher = (process, token)
    previous = os.environ.get(MARK)
    os.environ[MARK] = _watcher[1]
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(MARK, None)
        else:
            os.environ[MARK] = previous


def marked(token: str) -> list[psutil.Process]:
    """Every running process of this user that carries `token` (the watcher itself excluded)."""
    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if process.environ().get(MARK) == token:
                found.append(process)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def with_descendants(processes: list[psutil.Process]) -> dict[int, psutil.Process]:
    """The processes and everything below them now (Ray's agents do not inherit the mark: a raylet's
    children are started with an environment of their own)."""
    found: dict[int, psutil.Process] = {}
    for process in processes:
        try:
            found[process.pid] = process
            found.update((child.pid, child) for child in process.children(recursive=True))
        except psutil.Error:
            continue
    found.pop(os.getpid(), None)
    return found


def watch(token: str, pipe: int) -> None:
    """Until `pipe` closes, keep the marked processes' trees in view; then end them.

    The trees are refreshed twice a second, because a raylet may die before its agents once the
    simulation's process is gone, and its orphaned agents are found only in the last view.
    """
    seen: dict[int, psutil.Process] = {}
    while True:
        readable, _, _ = select.select([pipe], [], [], POLL_SECONDS)
        if readable and not os.read(pipe, 4096):
            break
        seen = with_descendants(marked(token))
    # The last view first, at once; then whatever a fresh look finds (it reads every process's
    # environment, which takes a moment on a busy machine).
    end(list(seen.values()))
    end(list(with_descendants(marked(token)).values()))


def end(processes: list[psutil.Process]) -> None:
    """SIGKILL them: their owner is gone, nothing is left to shut down gently (as
    `ray stop --force`).

    Files stay whole: ledgers, checkpoints and results are written by atomic rename.
    """
    for process in processes:
        try:
            process.kill()  # psutil checks the start time: a reused pid is never hit
        except psutil.Error:
            pass


if __name__ == "__main__":
    watch(sys.argv[1], sys.stdin.fileno())
