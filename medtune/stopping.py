"""Stopping a run on Ctrl-C or SIGTERM: within seconds, and never half-way through recording a
round.

A signal sets `STOP`. The round loop records a round (results, checkpoint) only inside
`recording()`, which refuses to start once `STOP` is set, so an interrupted round leaves no trace
on the coordinator: `--resume` repeats it from the last checkpoint. Each site writes its ledger
before its update leaves, so steps a site took are counted whether or not the round was recorded,
and the repeated round draws fresh noise (medtune/noise.py).

Flower's simulation runs the round loop in a thread that a signal cannot reach; it may be waiting
on replies for up to a round timeout. The signal handler therefore waits only for a recording in
progress, prints one line and ends the process at once (status 130). It never unwinds through
Flower: Flower's clean-up calls `ray.shutdown()` while its worker threads still wait in `ray.get`,
which could end the process with status 1 and a screen of tracebacks. Ray's helper processes end
with the process instead (medtune/federation/helper_processes.py).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from medtune.errors import MedTuneError

STOP = threading.Event()
_RECORDING = threading.Lock()
EXIT_STATUS = 130  # the shell's status for a run ended by SIGINT
RECORDING_GRACE_SECONDS = 30.0  # the longest a stop waits for a round's files to be written
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# the innermost stop_on_signals' handler
_active_handler: Callable[[int, object], None] | None = None


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
def stop_on_signals(afterwards: str) -> Iterator[None]:
    """On SIGINT or SIGTERM: let a recording finish, print `interrupted: stopped by SIG...;
    afterwards`, exit 130."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _stop(signum: int, frame: object) -> None:
        if STOP.is_set():  # a second signal while the first waits for a recording: end now
            os._exit(EXIT_STATUS)
        STOP.set()
        # Flower's simulation threads log every actor that dies as the process ends, each with a
        # traceback; after a stop those deaths are the stop itself, not an error worth a traceback.
        logging.getLogger("flwr").setLevel(logging.CRITICAL)
        # a round being recorded finishes its files
        if _RECORDING.acquire(timeout=RECORDING_GRACE_SECONDS):
            _RECORDING.release()
        # os.write, not print: the main thread may have been inside a write to the same stream.
        os.write(
            2, f"interrupted: stopped by {signal.Signals(signum).name}; {afterwards}\n".encode()
        )
        os._exit(EXIT_STATUS)

    global _active_handler
    outer = _active_handler
    previous = {sig: signal.signal(sig, _stop) for sig in STOP_SIGNALS}
    _active_handler = _stop
    try:
        yield
    finally:
        _active_handler = outer
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stop_now(signum: int) -> None:
    """Stop as the handler would, for a signal another library's handler caught first."""
    if _active_handler is not None:
        _active_handler(signum, None)


def reclaim_signals() -> None:
    """Put the stop handler back after a library replaced it (`ray.init` sets SIGTERM to
    `sys.exit`)."""
    if _active_handler is not None and threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, _active_handler)
