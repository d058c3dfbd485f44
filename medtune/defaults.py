"""MedTune's defaults, written once: `[tool.flwr.app.config]` of pyproject.toml.

`flwr run .` reads that table itself, so it cannot live anywhere else. Everything in Python takes
its defaults from here: the config dataclasses (medtune/config.py), the synthetic hospitals
(medtune/synth.py), `medtune simulate` and `medtune train` (whose flags are derived from the
config fields, with each key's comment in pyproject.toml as their help). A default is changed in
pyproject.toml and nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medtune.errors import ConfigError

PROJECT_DIR = Path(__file__).resolve().parents[1]
PYPROJECT = PROJECT_DIR / "pyproject.toml"
_TABLE = "[tool.flwr.app.config]"
_COMMENTED_KEY = re.compile(r"^([A-Za-z0-9_-]+)\s*=\s*.*?#\s*(.+)$")


def _pyproject_text() -> str:
    if not PYPROJECT.is_file():
        raise ConfigError(
            f"{PYPROJECT}: missing; MedTune reads its defaults from its project directory (install with `pip install -e .`)"
        )
    return PYPROJECT.read_text(encoding="utf-8")


@functools.cache
def _run_defaults() -> dict[str, Any]:
    return dict(tomllib.loads(_pyproject_text())["tool"]["flwr"]["app"]["config"])


def run_defaults() -> dict[str, Any]:
    """Every run-config key and its default (a fresh copy: callers may update it)."""
    return dict(_run_defaults())


def default(key: str) -> Any:
    """The default of one run-config key, e.g. default("prompt-length") == 16."""
    return _run_defaults()[key]


def from_pyproject(key: str, convert: Callable[[Any], Any] = lambda value: value) -> Any:
    """A dataclass field whose default is run-config key `key`, read when a config is first built.

    Read lazily, so importing MedTune never fails; without pyproject.toml, building a config is a
    one-line ConfigError at the command line.
    """
    return dataclasses.field(default_factory=lambda: convert(default(key)))


@functools.cache
def key_help() -> dict[str, str]:
    """Each run-config key's comment in pyproject.toml: the help text of the flag derived from it."""
    text = _pyproject_text()
    table = text[text.index(_TABLE) + len(_TABLE) :].split("\n[", 1)[0]
    return {match[1]: match[2].strip() for line in table.splitlines() if (match := _COMMENTED_KEY.match(line))}
