"""One frozen, validated config object per concern: model, data, privacy, training.

Each is checked once, when it is built, so a bad value fails at the edge with a message that names
the field, never deep inside torch or Opacus. Every default comes from pyproject.toml's run config
(medtune/defaults.py): a field named `prompt_length` takes the default of key `prompt-length`.
"""

from __future__ import annotations

import math
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from medtune.defaults import from_pyproject
from medtune.epsilon import check_epsilon
from medtune.errors import ConfigError

PROMPT_INITS = ("vocab", "random")
HEAD_INITS = ("label-names", "random")
ACCOUNTANTS = ("prv", "rdp")
AUDIT_MODES = ("both", "white-box", "black-box")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and soft prompt.

    `backbone` is a local Hugging Face checkpoint directory; None means the embedded MiniLM-L6.
    `num_layers` keeps only the first k transformer layers (None keeps all; cutting depth costs
    accuracy, see docs/benchmarks.md). `prompt_layer` is the block the prompt enters before:
    0 prepends it to the input embeddings; k > 0 runs blocks 0..k-1 once per record (cached at the
    site) and only blocks k..L per step. `head_init` starts the head from the frozen encoder's
    embeddings of the label names or descriptions ("label-names"), or at random.
    """

    backbone: str | None = from_pyproject("backbone", lambda value: value or None)
    num_layers: int | None = from_pyproject("num-layers", lambda value: value or None)
    prompt_length: int = from_pyproject("prompt-length")
    prompt_init: str = from_pyproject("prompt-init")
    max_length: int = from_pyproject("max-length")
    prompt_layer: int = from_pyproject("prompt-layer")
    head_init: str = from_pyproject("head-init")

    def __post_init__(self) -> None:
        if self.num_layers == 0:  # as in the run config (and --num-layers): 0 keeps every layer
            object.__setattr__(self, "num_layers", None)
        if self.backbone == "":  # as in the run config: "" is the embedded MiniLM
            object.__setattr__(self, "backbone", None)
        _require(
            self.num_layers is None or self.num_layers >= 1,
            "model.num_layers must be at least 1 (or unset to keep all layers), got "
            f"{self.num_layers}",
        )
        _require(
            self.prompt_length >= 1,
            f"model.prompt_length must be at least 1, got {self.prompt_length}",
        )
        _require(
            self.prompt_init in PROMPT_INITS,
            f"model.prompt_init must be one of {list(PROMPT_INITS)}, got {self.prompt_init!r}",
        )
        _require(
            self.max_length >= 2,
            f"model.max_length must be at least 2 tokens, got {self.max_length}",
        )
        _require(
            self.prompt_layer >= 0,
            "model.prompt_layer (prompt-layer) must be 0 (input) or a layer number, got "
            f"{self.prompt_layer}",
        )
        _require(
            self.head_init in HEAD_INITS,
            f"model.head_init (head-init) must be one of {list(HEAD_INITS)}, got "
            f"{self.head_init!r}",
        )


@dataclass(frozen=True)
class DataConfig:
    """Where a hospital's records are and how to read them.

    `labels` is the federation's label list: every hospital's head has these rows in this order.
    `label_descriptions` are short public descriptions of the labels, one per label in the same
    order ("" entries and an empty tuple fall back to the label itself); the label-name prior
    embeds them.
    """

    labels: tuple[str, ...]
    label_descriptions: tuple[str, ...] = ()  # run config "" (each label describes itself)
    text_column: str = from_pyproject("text-column")
    label_column: str = from_pyproject("label-column")
    test_fraction: float = from_pyproject("test-fraction")

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        _require(
            len(self.labels) >= 2, f"data.labels needs at least 2 labels, got {list(self.labels)}"
        )
        _require(
            all(label.strip() for label in self.labels),
            f"data.labels has an empty label name: {list(self.labels)}",
        )
        duplicates = sorted({label for label in self.labels if self.labels.count(label) > 1})
        _require(not duplicates, f"data.labels lists {duplicates} more than once")
        object.__setattr__(
            self, "label_descriptions", tuple(str(d).strip() for d in self.label_descriptions)
        )
        if self.label_descriptions and len(self.label_descriptions) != len(self.labels):
            missing = self.labels[len(self.label_descriptions) :]
            problem = (
                f"label '{missing[0]}' has no description"
                if missing
                else f"description {self.label_descriptions[len(self.labels)]!r} has no label"
            )
            raise ConfigError(
                "data.label_descriptions (label-descriptions) gives "
                f"{len(self.label_descriptions)} descriptions for {len(self.labels)} labels "
                f"{list(self.labels)}: {problem}; give one per label, in the label list's order"
            )
        _require(bool(self.text_column), "data.text_column must be a column name")
        _require(bool(self.label_column), "data.label_column must be a column name")
        _require(
            0.0 < self.test_fraction < 1.0,
            f"data.test_fraction must be strictly between 0 and 1, got {self.test_fraction}",
        )


@dataclass(frozen=True)
class PrivacyConfig:
    """A hospital's (epsilon, delta) target for its whole participation, and how DP-SGD spends it.

    epsilon = inf turns DP off (no clipping, no noise): the non-private baseline.
    """

    epsilon: float = from_pyproject("epsilon")  # text ("8", "inf") is read where it enters
    delta: float = from_pyproject("delta")
    max_grad_norm: float = from_pyproject("max-grad-norm")
    accountant: str = from_pyproject("accountant")

    def __post_init__(self) -> None:
        check_epsilon(self.epsilon, "privacy.epsilon")  # positive, or inf for no DP
        _require(
            0.0 < self.delta < 1.0,
            f"privacy.delta must be strictly between 0 and 1, got {self.delta}",
        )
        _require(
            self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm),
            f"privacy.max_grad_norm must be a positive number, got {self.max_grad_norm}",
        )
        _require(
            self.accountant in ACCOUNTANTS,
            f"privacy.accountant must be one of {list(ACCOUNTANTS)}, got {self.accountant!r}",
        )

    @property
    def is_private(self) -> bool:
        return math.isfinite(self.epsilon)


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation. `batch_size` is the expected Poisson batch size under DP.

    DP-SGD prefers large batches: the noise is added once per batch, so its share of each
    update shrinks as the batch grows.
    """

    # Passes over the records per federation round. A hospital alone has no rounds: its total
    # passes are an argument of train_local (`medtune train --epochs`), never this field.
    local_epochs: int = from_pyproject("local-epochs")
    batch_size: int = from_pyproject("batch-size")
    learning_rate: float = from_pyproject("learning-rate")
    seed: int = from_pyproject("seed")
    device: str = from_pyproject("device")

    def __post_init__(self) -> None:
        _require(
            self.local_epochs >= 1,
            f"train.local_epochs (local-epochs) must be at least 1, got {self.local_epochs}",
        )
        _require(
            self.batch_size >= 1, f"train.batch_size must be at least 1, got {self.batch_size}"
        )
        _require(
            0 <= self.seed < 2**32,
            f"train.seed must be a whole number from 0 to 2**32 - 1, got {self.seed}",
        )
        _require(
            self.learning_rate > 0 and math.isfinite(self.learning_rate),
            f"train.learning_rate must be a positive number, got {self.learning_rate}",
        )
        _require(
            self.device in ("auto", "cpu") or self.device.startswith("cuda"),
            f"train.device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}",
        )


def federation_passes(rounds: int, local_epochs: int) -> int:
    """Passes over a hospital's records in a whole federation: what its ledger's noise is planned
    for, and what a hospital alone or a pooled baseline makes to compare like with like."""
    return rounds * local_epochs


@dataclass(frozen=True)
class AuditConfig:
    """An epsilon audit's canaries (`medtune audit --canaries M`, medtune/canaries.py): M of each
    kind at one simulated hospital. 0 is every normal run; a deployed site refuses any other
    value."""

    canaries: int = from_pyproject("audit-canaries")
    hospital: str = from_pyproject("audit-hospital")
    mode: str = from_pyproject("audit-mode")

    @property
    def white_box(self) -> bool:
        return self.canaries > 0 and self.mode in ("both", "white-box")

    @property
    def black_box(self) -> bool:
        return self.canaries > 0 and self.mode in ("both", "black-box")

    def __post_init__(self) -> None:
        _require(
            self.mode in AUDIT_MODES, f"audit-mode must be one of {AUDIT_MODES}, got {self.mode!r}"
        )
        _require(
            self.canaries == 0 or self.canaries >= 2,
            "audit-canaries must be 0 (no audit) or at least 2 (an audit compares canaries in and "
            f"out), got {self.canaries}",
        )


def check_fits_backbone(model: ModelConfig) -> None:
    """The bounds only the backbone can judge, read from its config file (no weights) where settings
    are read: a recipe it cannot run is refused before any record is encoded or any feature cache is
    built.

    Its depth bounds `num-layers` and `prompt-layer`; its position table bounds `max-length` +
    `prompt-length` (the same bounds the model checks when it is built, medtune/model.py).
    """
    from transformers import AutoConfig

    from medtune.backbone import DEFAULT_BACKBONE_NAME, check_fits, embedded_backbone_path

    directory = Path(model.backbone) if model.backbone else Path(embedded_backbone_path())
    name = directory.name if model.backbone else DEFAULT_BACKBONE_NAME
    if not directory.is_dir():
        raise ConfigError(f"backbone directory {directory} does not exist (model.backbone)")
    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(
            f"cannot read a Hugging Face encoder config from {directory}: {error}"
        ) from None
    full = int(getattr(config, "num_hidden_layers", getattr(config, "n_layers", 0)))
    _require(
        model.num_layers is None or model.num_layers <= full,
        f"model.num_layers (num-layers) = {model.num_layers}, but the backbone {name} has only "
        f"{full} layers",
    )
    positions = int(getattr(config, "max_position_embeddings", 512))  # as Backbone reads it
    check_fits(model, model.num_layers or full, positions, name)


def field_kinds(config: type) -> dict[str, type | None]:
    """Each field of a config dataclass and the plain type of its value (`int | None` is int), as a
    run-config key and a CLI flag carry it; None for the label lists (tuples, spelt by their
    readers)."""
    hints = typing.get_type_hints(config)
    plain = (bool, int, float, str)
    return {
        f.name: next((kind for kind in plain if hints[f.name] in (kind, kind | None)), None)
        for f in fields(config)
    }


def run_config_key(field_name: str) -> str:
    """The run-config key (and CLI flag) of a config field: `prompt_length` is `prompt-length`."""
    return field_name.replace("_", "-")


def config_from_dict(cls: type, values: dict[str, Any]) -> Any:
    """Build a config dataclass from a plain dict, naming any key it does not know."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{cls.__name__} has no field(s) {unknown}; known fields are {sorted(known)}"
        )
    return cls(**values)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain, JSON-friendly dict of a config (tuples become lists)."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in asdict(config).items()
    }


__all__ = [
    "ModelConfig",
    "DataConfig",
    "PrivacyConfig",
    "TrainConfig",
    "federation_passes",
    "check_fits_backbone",
    "config_from_dict",
    "config_to_dict",
]
