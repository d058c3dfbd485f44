"""A hospital's name: the one identity that crosses the wire, and what it may look like.

The coordinator names files after it (out/updates/<round>/<hospital>.safetensors), and `medtune
certs node` names key files after it, so it must be a safe file name on every side.
"""

from __future__ import annotations

import re

from medtune.errors import ConfigError

HOSPITAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_hospital_name(hospital: str, source: str) -> str:
    """A hospital name that is safe as a file name on every side, or an error naming where it came from."""
    if not HOSPITAL_NAME.fullmatch(hospital):
        raise ConfigError(
            f"{source} {hospital!r}: use 1-64 letters, digits, '.', '-' or '_', starting with a letter or digit"
        )
    return hospital


def hospital_name(partition_id: int) -> str:
    """The name of simulated hospital `partition_id` (0-based)."""
    return f"hospital_{partition_id + 1}"
