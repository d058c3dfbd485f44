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
    TrainConfig,
    federation_passes,
    field_kinds,
    run_config_key,
)
from medtune.defaults import key_help, run_defaults
from medtune.epsilon import read_epsilon

# shorter spellings kept for users
FLAG_ALIASES = {"num_layers": ("--layers",), "learning_rate": ("--lr",)}
FLAG_CHOICES = {"prompt_init": PROMPT_INITS, "head_init": HEAD_INITS, "accountant": ACCOUNTANTS}
FLAG_HELP = {
    "epsilon": "target epsilon for the whole participation (inf: no DP; default: the run config's "
    "epsilon)",
}
NOT_FLAGS = {
    "labels",  # lists, given as --labels a,b and --label-descriptions 'x|y'
    "label_descriptions",
    "local_epochs",  # per federation round; alone, a hospital's total passes are --epochs
}


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
            # numbers are parsed here; epsilon's text ("inf") by given_flags, with its own errors
            type=kind if kind in (int, float) and name != "epsilon" else None,
            choices=FLAG_CHOICES.get(name),
            help=FLAG_HELP.get(name) or f"{helps.get(key, key)} (default: {defaults[key]!r})",
        )


def epsilon_flag(text: str) -> float:
    """An `--epsilon` flag's value, read once by the one epsilon reader."""
    return read_epsilon(text, "--epsilon")


def _passes(text: str) -> int:
    """--epochs' value, checked where it is read: a lone run's total passes is no config field."""
    try:
        passes = int(text)
    except ValueError:
        passes = 0
    if passes < 1:
        raise argparse.ArgumentTypeError(
            f"must be a whole number of passes, at least 1; got {text!r}"
        )
    return passes


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """The training flags of a command where a hospital trains alone: TrainConfig's, and --epochs.

    Alone a hospital has no rounds, so its passes over the records are a total (args.passes), not
    the per-round `local_epochs`. The default is what it makes in the default federation (rounds x
    local-epochs), to compare like with like.
    """
    group = parser.add_argument_group("training")
    defaults = run_defaults()
    passes = federation_passes(defaults["rounds"], defaults["local-epochs"])
    group.add_argument(
        "--epochs",
        dest="passes",
        metavar="N",
        type=_passes,
        default=passes,
        help=f"passes over the records, in total (default: {passes}, rounds x local-epochs of the "
        "run config, as a hospital makes them in the default federation)",
    )
    add_config_flags(group, TrainConfig)


def given_flags(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The config fields whose flags the user actually gave, as typed values."""
    given = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(config)
        if field.name not in NOT_FLAGS and getattr(args, field.name, None) is not None
    }
    if "epsilon" in given:
        given["epsilon"] = epsilon_flag(given["epsilon"])
    return given


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
