"""The numbers a model is judged by: loss, accuracy, macro-F1 and per-class counts, and their
pooling.

Plain counting over labels and logits, so the coordinator can pool hospitals' counts without
importing any model or records code; running a model over records is medtune/evaluation.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ClassCounts:
    label: str
    support: int
    predicted: int
    correct: int

    @property
    def f1(self) -> float:
        denominator = self.support + self.predicted
        return 0.0 if denominator == 0 else 2.0 * self.correct / denominator


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    macro_f1: float
    examples: int
    per_class: tuple[ClassCounts, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(
    labels: np.ndarray, predictions: np.ndarray, loss: float, label_names: tuple[str, ...]
) -> Evaluation:
    """Metrics from true and predicted label indices."""
    return from_counts(
        label_names,
        support=[int(np.sum(labels == i)) for i in range(len(label_names))],
        predicted=[int(np.sum(predictions == i)) for i in range(len(label_names))],
        correct=[int(np.sum((labels == i) & (predictions == i))) for i in range(len(label_names))],
        loss=loss,
    )


def from_counts(
    label_names: tuple[str, ...],
    support: list[int],
    predicted: list[int],
    correct: list[int],
    loss: float,
) -> Evaluation:
    """Metrics from per-class counts, so several hospitals' test sets can be pooled exactly.

    Macro-F1 averages over labels present in either the truth or the predictions, so a hospital
    without a label is not penalised for it.
    """
    per_class = tuple(
        ClassCounts(label=name, support=int(s), predicted=int(p), correct=int(c))
        for name, s, p, c in zip(label_names, support, predicted, correct, strict=True)
    )
    examples = sum(c.support for c in per_class)
    present = [c for c in per_class if c.support or c.predicted]
    return Evaluation(
        loss=float(loss),
        accuracy=sum(c.correct for c in per_class) / examples if examples else 0.0,
        macro_f1=float(np.mean([c.f1 for c in present])) if present else 0.0,
        examples=examples,
        per_class=per_class,
    )


def pool(evaluations: list[Evaluation]) -> Evaluation:
    """One evaluation over the union of several test sets (example-weighted loss, pooled counts)."""
    names = evaluations[0].per_class
    examples = sum(e.examples for e in evaluations)
    return from_counts(
        tuple(c.label for c in names),
        support=[sum(e.per_class[i].support for e in evaluations) for i in range(len(names))],
        predicted=[sum(e.per_class[i].predicted for e in evaluations) for i in range(len(names))],
        correct=[sum(e.per_class[i].correct for e in evaluations) for i in range(len(names))],
        loss=sum(e.loss * e.examples for e in evaluations) / examples if examples else 0.0,
    )


def score_logits(
    logits: torch.Tensor, labels: torch.Tensor, label_names: tuple[str, ...]
) -> Evaluation:
    """Metrics of given logits, so one model's logits can be scored under several label mixes."""
    loss = F.cross_entropy(logits, labels).item() if len(labels) else 0.0
    return summarize(labels.numpy(), logits.argmax(dim=1).numpy(), loss, label_names)
