"""A simulated run's flat config, as `flwr run` assembles it: the shipped defaults, then a scenario
file, then `--run-config` tokens and a command's flags, read by Flower's own token reader and fused
by Flower's own merge. It lives on the federation side because it uses Flower; the core's
medtune/run_config.py turns the result into settings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from click import ClickException
from flwr.common.config import fuse_dicts, parse_config_args

from medtune.defaults import run_defaults
from medtune.errors import ConfigError
from medtune.run_config import RunSettings, check_keys, read_scenario, settings_from_run_config

_OVERRIDE_TOKEN = re.compile(r"""(\S+?)=('[^']*'|"[^"]*"|\S+)|(\S+)""")


def parse_overrides(text: str) -> dict[str, Any]:
    """`key=value key2=value2`, each value read by Flower's own `--run-config` reader.

    Flower silently drops a token without `=` and lets a repeated key win; here both are errors: a
    mistyped `epsilon 1.0` must never leave a run at the default budget, nor `epsilon=1.0
    epsilon=50.0` quietly run at 50. Each token is read alone, so a bad value is named.
    """
    overrides: dict[str, Any] = {}
    for match in _OVERRIDE_TOKEN.finditer(text):
        key, value, stray = match.groups()
        if stray is not None:
            raise ConfigError(
                f"--run-config {text!r}: {stray!r} is not key=value (values go after '=', no "
                "spaces)"
            )
        if key in overrides:
            raise ConfigError(f"--run-config {text!r}: {key} is given twice; give each key once")
        try:
            overrides.update(parse_config_args([f"{key}={value}"]))
        except (ClickException, ValueError):
            raise ConfigError(
                f"--run-config {text!r}: {key}={value} is not a TOML value (numbers, true/false, "
                f'or quoted strings such as {key}="text")'
            ) from None
    return overrides


def resolve_run_config(scenario: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Defaults, then the scenario file, then explicit overrides, fused by Flower's own merge (as
    `flwr run` fuses them); an unknown key is named first."""
    check_keys(overrides, source="overrides")
    scenario_values = read_scenario(scenario) if scenario else {}
    return fuse_dicts(fuse_dicts(run_defaults(), scenario_values), overrides)


def run_settings(scenario: str | None, overrides: dict[str, Any]) -> RunSettings:
    """A simulated run's settings, read once where a command starts it.

    Its out and resume paths are made absolute: the server and the simulated hospitals (Ray workers
    have a working directory of their own) must agree on one out directory.
    """
    config = resolve_run_config(scenario, overrides)
    for key in ("out", "resume"):
        if isinstance(config[key], str) and config[key]:
            config[key] = str(Path(config[key]).resolve())
    return settings_from_run_config(config)
