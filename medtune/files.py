"""Atomic file writes: a crash mid-write leaves the previous file intact, never half a file."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from medtune.epsilon import NO_DP
from medtune.errors import MedTuneError


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
    as "inf", its one spelling in text (medtune/epsilon.py). NaN and -inf (a diverged loss a hospital
    reported) carry no number and are written as null, never as JavaScript's NaN."""
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
        raise MedTuneError(f"{path}: cannot be read as JSON ({error}); restore it or delete it to redo that step") from None


def safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The string pairs in a safetensors file's header (`__metadata__`), read without loading its arrays.

    safetensors files start with an 8-byte little-endian header length, then a JSON header.
    """
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    return dict(header.get("__metadata__", {}))
