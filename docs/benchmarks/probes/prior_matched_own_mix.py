"""Probe, not product (docs/benchmarks.md, section 1): which way of applying a hospital's own label
mix to the shared model beats the hospital alone on Medical Abstracts, and what is the ceiling?

Validation only: each hospital's training split is cut 80/20 as `medtune benchmark tune` does; no
test split is read. FedAvg is written out (no Flower) over MedTune's own train_local, as in
logit_adjusted_own_mix.py. Trained: each hospital alone, the federated model, and the pooled model
(one model on every hospital's records: the ceiling of any shared model), all with DP at EPSILON.
Each shared model is scored on every hospital's own validation part:

- asis: the shared model unchanged;
- uniform: + log pi_h, the shared model's mix taken as uniform (what `--label-mix` does today);
- matched: + b, with b chosen so that the model's mean predicted label mix over the hospital's own
  training records equals pi_h (Saerens et al., 2002: the model's own implicit mix is estimated
  at the site instead of assumed uniform). The product's medtune.label_mix.mix_bias since it was
  adopted; the 2026-11-27 run used the same fixed-point iteration, written here (200 steps).

    python docs/benchmarks/probes/prior_matched_own_mix.py SEED EPSILON

Prints one JSON line: [accuracy, macro-F1] on the hospitals' own validation parts, pooled.
Output of 2026-11-27: prior_matched_own_mix.jsonl (seeds 0 to 2, epsilon 8).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

import medtune.train as train_module
from medtune.backbone import load_backbone
from medtune.config import federation_passes
from medtune.data import train_test_split
from medtune.evaluation import predict_logits
from medtune.experiments.baselines import splits, train_alone
from medtune.experiments.sweep import read_sweep
from medtune.features import record_inputs
from medtune.federation.overrides import resolve_run_config
from medtune.label_mix import apply_label_mix, label_mix, mix_bias
from medtune.label_prior import initial_model
from medtune.metrics import pool, score_logits
from medtune.run_config import settings_from_run_config

seed, epsilon = int(sys.argv[1]), float(sys.argv[2])
sweep = read_sweep("medical_abstracts")
overrides = {**sweep.run_config, "seed": seed, "epsilon": epsilon}
settings = settings_from_run_config(resolve_run_config(sweep.scenario, overrides))
backbone = load_backbone(settings.model.backbone, settings.model.num_layers, "cpu")
pad = backbone.tokenizer.pad_token_id
cache = Path("runs/probes/feature-cache")
labels = len(settings.data.labels)
cpu = torch.device("cpu")
hospitals = []
for split in splits(settings):
    fit, validation = train_test_split(split.train, 0.2, settings.seed + 1)
    hospitals.append(
        {
            "records": fit,
            "fit": record_inputs(backbone, settings.model, fit, cache),
            "validation": record_inputs(backbone, settings.model, validation, cache),
            "mix": label_mix([r.label for r in fit], labels),
        }
    )


def own_validation(model) -> dict[str, list[float]]:
    scored: dict[str, list] = {"asis": [], "uniform": [], "matched": []}
    for hospital in hospitals:
        logits = predict_logits(model, hospital["validation"], pad, cpu)
        fit_logits = predict_logits(model, hospital["fit"], pad, cpu)
        truth = hospital["validation"].labels
        scored["asis"].append(score_logits(logits, truth, settings.data.labels))
        scored["uniform"].append(
            score_logits(
                apply_label_mix(logits, np.log(hospital["mix"])), truth, settings.data.labels
            )
        )
        matched = apply_label_mix(logits, mix_bias(fit_logits, hospital["mix"]))
        scored["matched"].append(score_logits(matched, truth, settings.data.labels))
    return {
        name: [round(pool(s).accuracy, 4), round(pool(s).macro_f1, 4)] for name, s in scored.items()
    }


def trained_alone(inputs, index: int):
    model = initial_model(backbone, settings.model, settings.data, seed=settings.seed)
    train_alone(settings, model, inputs, pad, seed=seed * 1000 + index)
    return model


def federated():
    model = initial_model(backbone, settings.model, settings.data, seed=settings.seed)
    state = model.exchanged_state()
    rounds = settings.federation.rounds
    ledgers = [
        train_module.new_ledger(
            settings.privacy,
            len(h["fit"]),
            settings.train.batch_size,
            federation_passes(rounds, settings.train.local_epochs),
        )
        for h in hospitals
    ]
    adam = [None] * len(hospitals)
    for server_round in range(rounds):
        updates, weights = [], []
        for index, hospital in enumerate(hospitals):
            local = initial_model(backbone, settings.model, settings.data, seed=settings.seed)
            local.load_exchanged_state(state)
            result = train_module.train_local(
                local,
                hospital["fit"],
                ledgers[index],
                settings.train,
                pad,
                seed=seed * 1000 + 100 * server_round + index,
                passes=settings.train.local_epochs,
                progress=False,
                optimizer_state=adam[index],
            )
            adam[index] = result.optimizer_state
            updates.append(local.exchanged_state())
            weights.append(result.examples)
        state = {
            name: sum(w * u[name] for w, u in zip(weights, updates)) / sum(weights)
            for name in updates[0]
        }
    model.load_exchanged_state(state)
    return model


alone = []
for index, hospital in enumerate(hospitals):
    model = trained_alone(hospital["fit"], index)
    logits = predict_logits(model, hospital["validation"], pad, cpu)
    alone.append(score_logits(logits, hospital["validation"].labels, settings.data.labels))
out = {"local": [round(pool(alone).accuracy, 4), round(pool(alone).macro_f1, 4)]}
out |= {f"federated_{k}": v for k, v in own_validation(federated()).items()}
every_record = [record for hospital in hospitals for record in hospital["records"]]
pooled = trained_alone(record_inputs(backbone, settings.model, every_record, cache), 99)
out |= {f"pooled_{k}": v for k, v in own_validation(pooled).items()}
print(
    json.dumps({"seed": seed, "epsilon": epsilon, "lr": settings.train.learning_rate}),
    json.dumps(out),
    flush=True,
)
