"""Exclusive OS file locks: one process at a time writes a run's out directory or a hospital's
ledger.

Two runs writing one out directory, or two SuperNodes charging one ledger, each read the ledger,
train, and write it back: the later write erases the earlier one's steps, and the ledger records
less than was spent. An advisory `flock` on a lock file beside the guarded path makes the second
process fail at once, naming the holder. The OS drops the lock when its holder exits, even on
SIGKILL, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medtune.errors import MedTuneError


class LockedError(MedTuneError):
    """Another process holds the out directory or ledger this one was asked to write."""


def lock_file_for(path: Path) -> Path:
    """The lock sits beside what it guards (`runs/.sim.lock`, `.ledger.json.lock`), whether that
    exists yet or not."""
    path = path.resolve()
    return path.with_name(f".{path.name}.lock")


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold `path` for this process for the duration of the block, or raise naming the holder."""
    lock = lock_file_for(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as error:
        raise MedTuneError(
            f"{lock}: cannot create the lock for {what} ({error.strerror})"
        ) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(handle, 200, 0).decode(errors="replace").strip() or "another process"
            raise LockedError(
                f"{path}: {what} is in use by {holder}; wait for it to end, or use another path"
            ) from None
        os.ftruncate(handle, 0)
        os.pwrite(
            handle,
            f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%H:%M:%S')}".encode(),
            0,
        )
        yield
    finally:
        os.close(handle)  # closing drops the lock
