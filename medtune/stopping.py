"""Stopping a run on Ctrl-C or SIGTERM: within seconds, and never half-way through recording a round.

A signal sets `STOP`. The round loop records a round (results, checkpoint) only inside
`recording()`, which refuses to start once `STOP` is set, so an interrupted round leaves no trace
on the coordinator: `--resume` repeats it from the last checkpoint. Each site writes its ledger
before its update leaves, so steps a site took are counted whether or not the round was recorded,
and the repeated round draws fresh noise (medtune.privacy.noise_seed).

Flower's simulation runs the round loop in a thread that a signal cannot reach; it may be waiting
on replies for up to a round timeout. `halt()` therefore waits only for a recording in progress,
shuts Ray's helper processes down, and the command line then ends the process at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from medtune.errors import MedTuneError

STOP = threading.Event()
_RECORDING = threading.Lock()
EXIT_STATUS = 130  # the shell's status for a run ended by SIGINT


class Interrupted(MedTuneError):
    """The run was stopped by a signal; what was recorded before it is intact and resumable."""


@contextmanager
def recording() -> Iterator[None]:
    """Write one round's record as a whole, or not at all once a stop was asked for."""
    with _RECORDING:
        if STOP.is_set():
            raise Interrupted("stopped by a signal before this round was recorded")
        yield


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into KeyboardInterrupt in the main thread, after setting STOP."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _stop(signum: int, frame: object) -> None:
        STOP.set()
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def halt(timeout: float = 30.0) -> None:
    """After a stop: let a round being recorded finish its files, then end Ray's helper processes."""
    STOP.set()
    acquired = _RECORDING.acquire(timeout=timeout)
    # Flower's simulation threads log every actor that dies as Ray shuts down, each with a traceback;
    # after a stop those deaths are the shutdown itself, not an error worth a traceback on screen.
    logging.getLogger("flwr").setLevel(logging.CRITICAL)
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass
    finally:
        if acquired:
            _RECORDING.release()
