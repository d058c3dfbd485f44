"""Classify texts with a checkpoint: only the checkpoint and the backbone are needed.

The checkpoint names its backbone and a hash of its weights; a different backbone is refused,
since the prompt and head are meaningless on any other encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medtune.backbone import load_backbone, weights_hash
from medtune.checkpoint import find_checkpoint, load_checkpoint
from medtune.data import Record, TokenizedRecords
from medtune.errors import CheckpointError
from medtune.metrics import predict_logits
from medtune.model import PromptClassifier
from medtune.train import resolve_device


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


def predict_texts(checkpoint_path: Path, texts: list[str], backbone: str | None = None) -> list[Prediction]:
    checkpoint = load_checkpoint(find_checkpoint(checkpoint_path))
    config = checkpoint.model
    loaded = load_backbone(backbone or config.backbone, config.num_layers)
    if weights_hash(loaded.encoder) != checkpoint.backbone_hash:
        raise CheckpointError(
            f"{checkpoint_path}: trained on backbone {checkpoint.backbone_name} with a different weights hash; "
            "pass --backbone with the checkpoint's backbone"
        )
    model = PromptClassifier(loaded, config, len(checkpoint.labels), seed=0)
    model.load_exchanged_state(checkpoint.arrays, source=str(checkpoint_path))
    dataset = TokenizedRecords([Record(text=t, label=0) for t in texts], loaded.tokenizer, config.max_length)
    logits = predict_logits(model, dataset, loaded.tokenizer.pad_token_id, resolve_device("auto"))
    probabilities = torch.softmax(logits, dim=1).numpy()
    labels = checkpoint.labels
    return [
        Prediction(text, labels[int(row.argmax())], {label: float(p) for label, p in zip(labels, row, strict=True)})
        for text, row in zip(texts, probabilities, strict=True)
    ]
