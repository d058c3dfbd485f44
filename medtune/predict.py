"""Classify texts with a checkpoint: only the checkpoint and the backbone are needed.

The checkpoint names its backbone and a hash of its weights; a different backbone is refused,
since the prompt and head are meaningless on any other encoder. A hospital may pass its own
labelled records (`--label-mix`) to re-weight the shared model to its label mix
(medtune/label_mix.py): the model reads those records too, to find the bias that matches its
predictions to their mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medtune.backbone import Backbone, resolve_device
from medtune.checkpoint import Checkpoint, model_from_checkpoint
from medtune.config import DataConfig
from medtune.data import Record, read_records
from medtune.evaluation import predict_logits
from medtune.features import record_inputs
from medtune.label_mix import apply_label_mix, label_mix, mix_bias
from medtune.model import PromptClassifier


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


@dataclass(frozen=True)
class SiteMix:
    """A hospital's label mix and the bias that re-weights the shared model to it
    (medtune/label_mix.py)."""

    mix: dict[str, float]
    bias: np.ndarray


@dataclass(frozen=True)
class Classifier:
    """A checkpoint's prompt and head on its backbone (weights hash checked), loaded once per
    command and used for the site's mix and the predictions alike."""

    checkpoint: Checkpoint
    model: PromptClassifier
    backbone: Backbone

    @classmethod
    def load(cls, path: Path, backbone: str | None = None) -> "Classifier":
        return cls(*model_from_checkpoint(path, backbone))

    def logits(self, records: list[Record]) -> torch.Tensor:
        dataset = record_inputs(self.backbone, self.checkpoint.model, records)
        pad = self.backbone.tokenizer.pad_token_id
        return predict_logits(self.model, dataset, pad, resolve_device("auto"))


def site_label_mix(
    classifier: Classifier, records_path: Path, text_column: str, label_column: str
) -> SiteMix:
    """The label mix of a hospital's own labelled records, and the shared model's bias matched to
    it."""
    labels = classifier.checkpoint.labels
    records = read_records(
        records_path, DataConfig(labels=labels, text_column=text_column, label_column=label_column)
    )
    mix = label_mix([r.label for r in records], len(labels))
    bias = mix_bias(classifier.logits(records), mix)
    return SiteMix(dict(zip(labels, mix.tolist(), strict=True)), bias)


def predict_texts(
    classifier: Classifier, texts: list[str], site: SiteMix | None = None
) -> list[Prediction]:
    """Label and probabilities per text; `site` re-weights them to a hospital's own label mix."""
    logits = classifier.logits([Record(text=t, label=0) for t in texts])
    if site is not None:
        logits = apply_label_mix(logits, site.bias)
    probabilities = torch.softmax(logits, dim=1).numpy()
    labels = classifier.checkpoint.labels
    return [
        Prediction(
            text,
            labels[int(row.argmax())],
            {label: float(p) for label, p in zip(labels, row, strict=True)},
        )
        for text, row in zip(texts, probabilities, strict=True)
    ]
