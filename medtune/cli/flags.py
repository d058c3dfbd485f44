"""Flags derived from the config dataclasses: `prompt_length` becomes --prompt-length, with the
default and help of run-config key `prompt-length` in pyproject.toml; flags left unset keep those
defaults."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from medtune.config import (
    ACCOUNTANTS,
    HEAD_INITS,
    PROMPT_INITS,
    DataConfig,
    field_kinds,
    run_config_key,
)
from medtune.defaults import key_help, run_defaults

FLAG_ALIASES = {
    "num_layers": ("--layers",),
    "learning_rate": ("--lr",),
}  # shorter spellings kept for users
FLAG_CHOICES = {"prompt_init": PROMPT_INITS, "head_init": HEAD_INITS, "accountant": ACCOUNTANTS}
FLAG_HELP = {
    "epochs": "passes over the records (default: rounds x local-epochs of the run config, as in "
    "the default federation)",
    "epsilon": "target epsilon for the whole participation (inf: no DP; default: the run config's "
    "epsilon)",
}
NOT_FLAGS = {
    "labels",
    "label_descriptions",
}  # lists, given as --labels a,b and --label-descriptions 'x|y'


def add_config_flags(group: Any, config: type) -> None:
    """One flag per field of a config dataclass; unset flags keep the field's default
    (pyproject.toml)."""
    helps, defaults = key_help(), run_defaults()
    for name, kind in field_kinds(config).items():
        if name in NOT_FLAGS:
            continue
        key = run_config_key(name)
        group.add_argument(
            f"--{key}",
            *FLAG_ALIASES.get(name, ()),
            dest=name,
            # numbers are parsed here; epsilon's text ("inf") is read by PrivacyConfig
            type=kind if kind in (int, float) and name != "epsilon" else None,
            choices=FLAG_CHOICES.get(name),
            help=FLAG_HELP.get(name) or f"{helps.get(key, key)} (default: {defaults[key]!r})",
        )


def given_flags(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The config fields whose flags the user actually gave."""
    return {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(config)
        if field.name not in NOT_FLAGS and getattr(args, field.name, None) is not None
    }


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        type=Path,
        help="records file (.csv, .jsonl, .parquet); default: one synthetic hospital of 1,500 "
        "notes",
    )
    group.add_argument(
        "--labels", help="comma-separated federation label list (default: the synthetic labels)"
    )
    group.add_argument("--label-descriptions", help=key_help().get("label-descriptions"))
    add_config_flags(group, DataConfig)
