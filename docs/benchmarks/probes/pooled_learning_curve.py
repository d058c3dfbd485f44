"""Probe, not product (docs/benchmarks.md, section 1): does a shared model on Medical Abstracts gain
from more records than one hospital holds? If one hospital's worth of records already scores what
all three hospitals' records score, federation has no data advantage to offer a hospital on its own
label mix.

Validation only: each hospital's training split is cut 80/20 as `medtune benchmark tune` does; no
test split is read. One model is trained on a random FRACTION of all hospitals' fit parts together
(the label mix of the whole federation), with DP at EPSILON and the sweep's recipe, and scored on
every hospital's validation part together.

    python docs/benchmarks/probes/pooled_learning_curve.py SEED EPSILON FRACTION [FRACTION ...]

Prints one JSON line per fraction: records trained on, [accuracy, macro-F1].
Output of 2026-11-27: pooled_learning_curve.jsonl (seeds 0 to 2, epsilon 8, fractions
0.333, 0.667, 1).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from medtune.backbone import load_backbone
from medtune.data import train_test_split
from medtune.evaluation import predict_logits
from medtune.experiments.baselines import splits, train_alone
from medtune.experiments.sweep import read_sweep
from medtune.features import record_inputs
from medtune.federation.overrides import resolve_run_config
from medtune.label_prior import initial_model
from medtune.metrics import score_logits
from medtune.run_config import settings_from_run_config

seed, epsilon, fractions = int(sys.argv[1]), float(sys.argv[2]), [float(f) for f in sys.argv[3:]]
sweep = read_sweep("medical_abstracts")
settings = settings_from_run_config(
    resolve_run_config(sweep.scenario, {**sweep.run_config, "seed": seed, "epsilon": epsilon})
)
backbone = load_backbone(settings.model.backbone, settings.model.num_layers, "cpu")
pad = backbone.tokenizer.pad_token_id
cache = Path("runs/probes/feature-cache")
fit, validation = [], []
for split in splits(settings):
    part, held_out = train_test_split(split.train, 0.2, settings.seed + 1)
    fit += part
    validation += held_out
scored_on = record_inputs(backbone, settings.model, validation, cache)
order = np.random.default_rng(seed).permutation(len(fit))
for fraction in fractions:
    chosen = [fit[i] for i in order[: round(fraction * len(fit))]]
    inputs = record_inputs(backbone, settings.model, chosen, cache)
    model = initial_model(backbone, settings.model, settings.data, seed=settings.seed)
    train_alone(settings, model, inputs, pad, seed=seed * 1000 + 7)
    result = score_logits(
        predict_logits(model, scored_on, pad, torch.device("cpu")),
        scored_on.labels,
        settings.data.labels,
    )
    line = {"seed": seed, "epsilon": epsilon, "fraction": fraction, "records": len(chosen)}
    print(
        json.dumps(line),
        json.dumps([round(result.accuracy, 4), round(result.macro_f1, 4)]),
        flush=True,
    )
