"""Checkpoints: the exchanged state as safetensors plus JSON metadata, loadable without training
code.

A checkpoint directory holds `state.safetensors` (prompt, head.weight, head.bias) and
`meta.json` (labels, model config, backbone name and weights hash, and whatever the writer adds,
such as the round). The head's rows follow the label order, so the labels are also written into
the state file's own metadata and must agree on loading: an edited or swapped label list would
otherwise name every prediction wrongly, without a word. Each file is written atomically, meta.json
last: a directory without it is a checkpoint whose writer was interrupted, and is never picked to
resume from.

`model_from_checkpoint` is the one way from a checkpoint to a model (predict, audit, baselines):
it refuses a backbone whose weights hash is not the one the prompt and head were trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from medtune.backbone import Backbone, load_backbone
from medtune.config import ModelConfig, config_from_dict, config_to_dict
from medtune.errors import CheckpointError, ConfigError, StateError
from medtune.files import atomic_write_bytes, atomic_write_json, safetensors_metadata
from medtune.model import PromptClassifier
from medtune.state import ExchangedStateSpec

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
LABELS_KEY = "medtune.labels"  # the label order, in state.safetensors' own metadata


def _state_labels(raw: bytes) -> tuple[str, ...] | None:
    """The label order a state file was saved with (None: written before it was recorded)."""
    labels = safetensors_metadata(raw).get(LABELS_KEY)
    return None if labels is None else tuple(str(label) for label in json.loads(labels))


@dataclass
class Checkpoint:
    arrays: dict[str, np.ndarray]
    labels: tuple[str, ...]
    model: ModelConfig
    backbone_name: str
    backbone_hash: str
    extra: dict[str, Any]

    @property
    def spec(self) -> ExchangedStateSpec:
        prompt_length, hidden = self.arrays["prompt"].shape
        return ExchangedStateSpec(prompt_length, hidden, len(self.labels))


def save_checkpoint(directory: str | Path, checkpoint: Checkpoint) -> Path:
    directory = Path(directory)
    checked = checkpoint.spec.check(checkpoint.arrays, source=str(directory))
    labels = json.dumps(list(checkpoint.labels))
    atomic_write_bytes(
        directory / STATE_FILE, save_safetensors(dict(checked), metadata={LABELS_KEY: labels})
    )
    meta = {
        "labels": list(checkpoint.labels),
        "model": config_to_dict(checkpoint.model),
        "backbone_name": checkpoint.backbone_name,
        "backbone_hash": checkpoint.backbone_hash,
        **checkpoint.extra,
    }
    atomic_write_json(directory / META_FILE, meta)
    return directory


def load_checkpoint(directory: str | Path) -> Checkpoint:
    """Read and check a checkpoint; a missing or corrupted file is a CheckpointError naming it."""
    directory = Path(directory)
    state_path, meta_path = directory / STATE_FILE, directory / META_FILE
    for path in (state_path, meta_path):
        if not path.is_file():
            raise CheckpointError(
                f"{path}: missing; a checkpoint directory needs {STATE_FILE} and {META_FILE}"
            )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        labels = tuple(str(label) for label in meta.pop("labels"))
        model = config_from_dict(ModelConfig, meta.pop("model"))
        backbone_name = str(meta.pop("backbone_name"))
        backbone_hash = str(meta.pop("backbone_hash"))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"{meta_path}: corrupted metadata ({type(error).__name__}: {error})"
        ) from None
    try:
        raw = state_path.read_bytes()
        arrays = load_safetensors(raw)
        saved_labels = _state_labels(raw)
    # safetensors raises its own error types for truncated or garbled files
    except Exception as error:
        raise CheckpointError(f"{state_path}: corrupted state file ({error})") from None
    if saved_labels is not None and saved_labels != labels:
        raise CheckpointError(
            f"{meta_path}: labels {list(labels)} differ from {list(saved_labels)}, the order the "
            f"head in {STATE_FILE} was saved with; restore meta.json (every prediction would be "
            "named wrongly)"
        )
    checkpoint = Checkpoint(arrays, labels, model, backbone_name, backbone_hash, meta)
    try:
        checkpoint.arrays = dict(checkpoint.spec.check(arrays, source=str(state_path)))
    except (KeyError, ValueError, StateError) as error:
        raise CheckpointError(f"{state_path}: not a MedTune exchanged state ({error})") from None
    return checkpoint


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, a local run's `checkpoint/`, or the newest complete
    `checkpoints/round_NNN/`."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    if (path / "checkpoint" / META_FILE).is_file():
        return path / "checkpoint"
    rounds = sorted(
        round_dir
        for round_dir in (path / "checkpoints").glob("round_*")
        if (round_dir / META_FILE).is_file()
    )
    if not rounds:
        raise CheckpointError(
            f"{path}: no checkpoint here (expected meta.json, checkpoint/ or "
            "checkpoints/round_NNN/)"
        )
    return rounds[-1]


def check_resume_location(out: Path, resume: Path) -> None:
    """A resumed run writes where the original did (its out directory or a checkpoint under it).

    Anywhere else, each hospital's ledger path would change and its spent epsilon be forgotten.
    """
    if out.resolve() != resume.resolve() and out.resolve() not in resume.resolve().parents:
        raise ConfigError(
            f"resume checkpoint {resume} is not under this run's out directory {out}; a resumed "
            "run must write where the original did, so each hospital's privacy ledger continues"
        )


def model_from_checkpoint(
    path: Path, backbone: str | None = None, device: str = "auto", read: Checkpoint | None = None
) -> tuple[Checkpoint, PromptClassifier, Backbone]:
    """A checkpoint's prompt and head on the backbone it names (or `backbone`), checked by weights
    hash.

    `path` is a checkpoint directory or a run's out directory (its latest checkpoint). The prompt
    and head are meaningless on any other encoder, so a backbone with another weights hash is
    refused. `read` is the checkpoint already read from `path`, when the caller has it.
    """
    checkpoint = read if read is not None else load_checkpoint(find_checkpoint(path))
    config = checkpoint.model
    loaded = load_backbone(backbone or config.backbone, config.num_layers, device)
    if loaded.fingerprint != checkpoint.backbone_hash:
        raise CheckpointError(
            f"{path}: trained on backbone {checkpoint.backbone_name} with a different weights "
            "hash; give the backbone it was trained on (predict: --backbone)"
        )
    # the seed is overwritten just below
    model = PromptClassifier(loaded, config, len(checkpoint.labels), seed=0)
    model.load_exchanged_state(checkpoint.arrays, source=str(path))
    return checkpoint, model, loaded
