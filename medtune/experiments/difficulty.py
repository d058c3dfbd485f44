"""How hard the synthetic hospitals are: pooled non-private training vs the smallest hospital alone.

Both models are scored on the same pooled test set (every hospital's test split), so the gap
measures what a small hospital loses by training alone, not a difference in test sets.
"""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from medtune.backbone import load_backbone, resolve_device
from medtune.config import ModelConfig, PrivacyConfig, TrainConfig
from medtune.data import Record, train_test_split
from medtune.evaluation import evaluate
from medtune.features import record_inputs
from medtune.metrics import Evaluation
from medtune.model import PromptClassifier
from medtune.synth import LABELS, SynthConfig, generate_hospitals
from medtune.train import new_ledger, train_local


def run_difficulty(
    synth: SynthConfig, model_config: ModelConfig, train: TrainConfig, passes: int
) -> dict[str, Evaluation]:
    """Each model trains alone (no rounds) for `passes` passes over its records, without DP."""
    backbone = load_backbone(model_config.backbone, model_config.num_layers)
    pad = backbone.tokenizer.pad_token_id
    splits = [
        train_test_split([Record(t, LABELS.index(label)) for t, label in hospital], 0.2, train.seed)
        for hospital in generate_hospitals(synth)
    ]
    pooled_test = record_inputs(backbone, model_config, [r for _, test in splits for r in test])
    smallest = min(range(len(splits)), key=lambda i: len(splits[i][0]))
    training_sets = {
        "pooled (all hospitals)": [r for train_part, _ in splits for r in train_part],
        f"hospital {smallest + 1} alone": splits[smallest][0],
    }
    results = {}
    for name, records in training_sets.items():
        dataset = record_inputs(backbone, model_config, records)
        model = PromptClassifier(backbone, model_config, len(LABELS), seed=train.seed)
        ledger = new_ledger(PrivacyConfig(epsilon=math.inf), len(dataset), train.batch_size, passes)
        train_local(model, dataset, ledger, train, pad, seed=train.seed, passes=passes)
        results[f"{name}, {len(records)} train records"] = evaluate(
            model, pooled_test, LABELS, pad, resolve_device(train.device)
        )
    table = Table(
        title=f"Synthetic difficulty (non-private, pooled test set of {len(pooled_test)} records)"
    )
    for column in ("trained on", "accuracy", "macro-F1"):
        table.add_column(column)
    for name, evaluation in results.items():
        table.add_row(name, f"{evaluation.accuracy:.3f}", f"{evaluation.macro_f1:.3f}")
    Console().print(table)
    return results
