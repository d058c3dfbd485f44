"""Atomic file writes: a crash mid-write leaves the previous file intact, never half a file; output
paths checked writable before the work that fills them starts."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from medtune.epsilon import NO_DP
from medtune.errors import ConfigError, MedTuneError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def json_ready(value: Any) -> Any:
    """JSON has no infinity: +inf (epsilon = inf: no DP; max-update-norm = inf: no bound) is written
    as "inf", its one spelling in text (medtune/epsilon.py). NaN and -inf (a diverged loss a
    hospital reported) carry no number and are written as null, never as JavaScript's NaN."""
    if isinstance(value, float) and value == math.inf:
        return NO_DP
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def atomic_write_json(path: str | Path, value: Any) -> None:
    text = json.dumps(json_ready(value), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def read_json(path: str | Path) -> Any:
    """A JSON file written by MedTune; a damaged one is named in the error, never read as empty."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MedTuneError(
            f"{path}: cannot be read as JSON ({error}); restore it or delete it to redo that step"
        ) from None


def safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The string pairs in a safetensors file's header (`__metadata__`), read without loading its
    arrays.

    safetensors files start with an 8-byte little-endian header length, then a JSON header.
    """
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    return dict(header.get("__metadata__", {}))


def check_writable(path: str | Path, folder: bool, flag: str = "--out") -> None:
    """Refuse an output path that cannot be written before any work starts, not when its results are
    due.

    `path` is a folder (folder=True) or a file. Makes the missing folders and a probe file in the
    target folder, then removes all it made: a refused command, or one that fails later, leaves
    nothing behind, and a path that passes here can be written when the results come.
    """
    path = Path(path)
    target = path if folder else path.parent
    if not folder and path.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; give the file to write")
    made: list[Path] = []
    try:
        for missing in reversed([p for p in (target, *target.parents) if not p.exists()]):
            missing.mkdir()
            made.append(missing)
        handle, probe = tempfile.mkstemp(prefix=".medtune-write-check-", dir=target)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        where = f" ({error.filename})" if error.filename and Path(error.filename) != path else ""
        raise ConfigError(
            f"{flag} {path}: cannot be written{where}: {error.strerror or error}"
        ) from None
    finally:
        for directory in reversed(made):
            # another process put something there meanwhile: keep it
            with contextlib.suppress(OSError):
                directory.rmdir()
