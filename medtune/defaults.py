"""MedTune's defaults, written once for Python: medtune/run_defaults.toml, shipped inside the
package.

An installed wheel has no pyproject.toml, so the run-config defaults travel with the package, read
through importlib.resources (the same from a source checkout, an editable install or a wheel).
`flwr run .` reads `[tool.flwr.app.config]` of pyproject.toml itself, so that table stays too;
tests/test_packaging.py names any key whose value or comment differs between the two. Everything
in Python takes its defaults from here: the config dataclasses (medtune/config.py), the synthetic
hospitals (medtune/synth.py), `medtune simulate` and `medtune train` (whose flags are derived from
the config fields, with each key's comment as their help).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import tomllib
from collections.abc import Callable
from importlib import resources
from typing import Any

from medtune.errors import ConfigError

# package data of `medtune` (pyproject.toml, [tool.setuptools.package-data])
DEFAULTS_FILE = "run_defaults.toml"
_COMMENTED_KEY = re.compile(r"^([A-Za-z0-9_-]+)\s*=\s*.*?#\s*(.+)$")


@functools.cache
def defaults_text() -> str:
    """run_defaults.toml as shipped: its values, and its comments (the flags' help)."""
    shipped = resources.files("medtune").joinpath(DEFAULTS_FILE)
    try:
        return shipped.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(
            f"{shipped}: unreadable ({error.strerror or error}); reinstall MedTune"
        ) from None


@functools.cache
def _run_defaults() -> dict[str, Any]:
    try:
        return tomllib.loads(defaults_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"medtune/{DEFAULTS_FILE}: not valid TOML ({error})") from None


def run_defaults() -> dict[str, Any]:
    """Every run-config key and its default (a fresh copy: callers may update it)."""
    return dict(_run_defaults())


def default(key: str) -> Any:
    """The default of one run-config key, e.g. default("prompt-length") == 16."""
    return _run_defaults()[key]


def from_pyproject(key: str, convert: Callable[[Any], Any] = lambda value: value) -> Any:
    """A dataclass field whose default is run-config key `key`, read when a config is first built.

    Read lazily, so importing MedTune never fails; an unreadable run_defaults.toml is a one-line
    ConfigError at the command line.
    """
    return dataclasses.field(default_factory=lambda: convert(default(key)))


def key_comments(table: str) -> dict[str, str]:
    """The comment of each `key = value  # comment` line of a TOML table's text, by key."""
    return {
        match[1]: match[2].strip()
        for line in table.splitlines()
        if (match := _COMMENTED_KEY.match(line))
    }


@functools.cache
def key_help() -> dict[str, str]:
    """Each run-config key's comment in run_defaults.toml: the help text of the flag derived from
    it."""
    return key_comments(defaults_text())
