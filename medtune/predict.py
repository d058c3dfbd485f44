"""Classify texts with a checkpoint: only the checkpoint and the backbone are needed.

The checkpoint names its backbone and a hash of its weights; a different backbone is refused,
since the prompt and head are meaningless on any other encoder. A hospital may pass its own
labelled records (`--label-mix`) to re-weight the shared model to its label mix (medtune/label_mix.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medtune.backbone import resolve_device
from medtune.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
from medtune.config import DataConfig
from medtune.data import Record, read_records
from medtune.features import record_inputs
from medtune.label_mix import apply_label_mix, label_mix
from medtune.evaluation import predict_logits


@dataclass(frozen=True)
class Prediction:
    text: str
    label: str
    probabilities: dict[str, float]

    def format(self) -> str:
        ranked = sorted(self.probabilities.items(), key=lambda item: -item[1])
        shown = "  ".join(f"{label}={p:.3f}" for label, p in ranked)
        preview = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return f"{self.label}\t{shown}\t{preview}"


def site_label_mix(checkpoint_path: Path, records_path: Path, text_column: str, label_column: str) -> dict[str, float]:
    """The label mix of a hospital's own labelled records, over the checkpoint's labels."""
    labels = load_checkpoint(find_checkpoint(checkpoint_path)).labels
    records = read_records(records_path, DataConfig(labels=labels, text_column=text_column, label_column=label_column))
    return dict(zip(labels, label_mix([r.label for r in records], len(labels)).tolist(), strict=True))


def predict_texts(
    checkpoint_path: Path, texts: list[str], backbone: str | None = None, mix: dict[str, float] | None = None
) -> list[Prediction]:
    """Label and probabilities per text; `mix` re-weights them to a hospital's own label mix."""
    checkpoint, model, loaded = model_from_checkpoint(checkpoint_path, backbone)
    dataset = record_inputs(loaded, checkpoint.model, [Record(text=t, label=0) for t in texts])
    logits = predict_logits(model, dataset, loaded.tokenizer.pad_token_id, resolve_device("auto"))
    if mix is not None:
        logits = apply_label_mix(logits, np.array([mix[label] for label in checkpoint.labels]))
    probabilities = torch.softmax(logits, dim=1).numpy()
    labels = checkpoint.labels
    return [
        Prediction(text, labels[int(row.argmax())], {label: float(p) for label, p in zip(labels, row, strict=True)})
        for text, row in zip(texts, probabilities, strict=True)
    ]
