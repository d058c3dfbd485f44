"""Scoring a prompt classifier on a hospital's records: logits in batches, then the metrics."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from medtune.data import PadToLongest
from medtune.features import RecordInputs
from medtune.metrics import Evaluation, score_logits


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    dataset: RecordInputs,
    pad_token_id: int,
    device: torch.device,
    batch_size: int = 64,
) -> torch.Tensor:
    model.to(device).eval()
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=PadToLongest(pad_token_id)
    )
    chunks = [
        model(batch["inputs"].to(device), batch["attention_mask"].to(device)).float().cpu()
        for batch in loader
    ]
    return torch.cat(chunks) if chunks else torch.empty(0, len(model.get_parameter("head.bias")))


def evaluate(
    # a PromptClassifier, or any module from (inputs, attention mask) to logits with a head
    model: torch.nn.Module,
    dataset: RecordInputs,
    label_names: tuple[str, ...],
    pad_token_id: int,
    device: torch.device,
) -> Evaluation:
    return score_logits(
        predict_logits(model, dataset, pad_token_id, device), dataset.labels, label_names
    )
