"""Ray's helper processes end with the simulation's process, even after a SIGKILL (issue 14).

The helpers here are stand-ins (sleeping processes two levels deep, one ignoring SIGTERM), so the
test needs no Ray; tests/hostile_catalogue.py checks the same with a real simulation.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import psutil

DRIVER = textwrap.dedent(
    """
    import json, subprocess, sys, time
    from medtune.federation.helper_processes import end_helpers_with_this_process

    end_helpers_with_this_process()
    end_helpers_with_this_process()  # a second simulation in the same process adds no second watcher
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"  # SIGKILL ends it
    helper = subprocess.Popen([sys.executable, "-c", stubborn])
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen(['sleep', '600']); time.sleep(600)"])
    time.sleep(1.5)  # the watcher has seen them (it looks twice a second)
    print(json.dumps([helper.pid, parent.pid]), flush=True)
    time.sleep(600)
    """
)


def _driver() -> tuple[subprocess.Popen, list[psutil.Process]]:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    first = json.loads(driver.stdout.readline())
    helpers = [psutil.Process(pid) for pid in first]
    helpers += [child for helper in list(helpers) for child in helper.children(recursive=True)]
    return driver, helpers


def _watchers_of(driver: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(driver.pid).children() if "medtune.federation.helper_processes" in p.cmdline()]


def test_a_sigkilled_simulation_leaves_no_helper_process_behind() -> None:
    bystander = subprocess.Popen(["sleep", "600"])  # not the simulation's: must survive
    driver, helpers = _driver()
    try:
        assert len(_watchers_of(driver)) == 1
        assert len(helpers) == 3
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        gone, alive = psutil.wait_procs(helpers, timeout=15)
        assert not alive, f"helpers outlived the SIGKILL: {[p.pid for p in alive]}"
        assert bystander.poll() is None
    finally:
        bystander.kill()
        for process in helpers:
            if process.is_running():
                process.kill()


def test_helpers_end_after_a_normal_exit_and_the_watcher_ignores_ctrl_c() -> None:
    driver, helpers = _driver()
    watcher = _watchers_of(driver)[0]
    try:
        watcher.send_signal(signal.SIGINT)  # Ctrl-C reaches the whole process group
        time.sleep(0.5)
        assert watcher.is_running()
        driver.terminate()  # not trapped in the driver: it ends as a plain exit would
        driver.wait()
        _, alive = psutil.wait_procs([*helpers, watcher], timeout=15)
        assert not alive
    finally:
        for process in [*helpers, watcher]:
            if process.is_running():
                process.kill()
