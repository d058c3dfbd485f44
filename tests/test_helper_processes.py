"""Ray's helper processes end with the simulation's process, even after a SIGKILL (issue 14).

The helpers here are stand-ins started inside `ray_helpers_marked()` as Ray's are (one ignoring
SIGTERM, one with a child of its own), so the test needs no Ray; tests/hostile_catalogue.py checks
the same with a real simulation.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import psutil

DRIVER = textwrap.dedent(
    """
    import json, subprocess, sys
    from medtune.federation.helper_processes import ray_helpers_marked

    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    with ray_helpers_marked():
        helper = subprocess.Popen([sys.executable, "-c", stubborn])
        parent = subprocess.Popen(["sh", "-c", "sleep 600 & wait"])
    with ray_helpers_marked():  # a second simulation in the same process: the same watcher
        pass
    bystander = subprocess.Popen(["sleep", "600"])  # started outside: not a helper
    print(json.dumps([helper.pid, parent.pid, bystander.pid]), flush=True)
    sys.stdin.readline()  # the test says when to exit
    """
)


WAIT = 30.0  # seconds for any one step of the driver; each wait below fails after it, saying which


def _kill(processes: list[psutil.Process]) -> None:
    """Kill what this test started and is still running, its descendants first."""
    descendants = []
    for process in processes:
        try:
            descendants += process.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for process in [*descendants, *processes]:
        try:
            if process.is_running():
                process.kill()
        except psutil.NoSuchProcess:
            pass


def _start() -> tuple[subprocess.Popen, list[psutil.Process], psutil.Process]:
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    started: list[psutil.Process] = []
    try:
        if not select.select([driver.stdout], [], [], WAIT)[0]:
            raise AssertionError(f"the driver printed no helper pids within {WAIT} s")
        helper, parent, bystander = started = [
            psutil.Process(pid) for pid in json.loads(driver.stdout.readline())
        ]
        deadline = time.monotonic() + WAIT
        while not parent.children():  # the shell has started its sleep
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the helper shell (pid {parent.pid}) started no child within {WAIT} s"
                )
            time.sleep(0.01)
    except BaseException:
        driver.kill()
        _kill(started)
        raise
    return driver, [helper, parent, *parent.children()], bystander


def _watchers(driver: subprocess.Popen) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(driver.pid).children()
        if "medtune.federation.helper_processes" in p.cmdline()
    ]


def _ends(how: str) -> None:
    driver, helpers, bystander = _start()
    try:
        watchers = _watchers(driver)
        assert len(watchers) == 1
        # a group's Ctrl-C or SIGTERM misses it
        assert os.getsid(watchers[0].pid) != os.getsid(driver.pid)
        if how == "sigkill":
            driver.send_signal(signal.SIGKILL)
        else:
            # a normal exit (not communicate(): the bystander holds the driver's stdout)
            driver.stdin.write("\n")
            driver.stdin.close()
        try:
            driver.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the driver did not exit within {WAIT} s ({how})") from None
        _, alive = psutil.wait_procs(helpers, timeout=15)
        assert not alive, f"helpers outlived the simulation's process: {[p.pid for p in alive]}"
        assert bystander.is_running() and bystander.status() != psutil.STATUS_ZOMBIE
    finally:
        if driver.poll() is None:
            driver.kill()
        _kill([*helpers, bystander])


def test_a_sigkilled_simulation_leaves_no_helper_process_behind_and_spares_the_rest() -> None:
    _ends("sigkill")


def test_helpers_end_after_a_normal_exit() -> None:
    _ends("exit")
