r"""Probe, not product (docs/benchmarks.md, section 1): can the global model with a hospital's own
label mix beat the hospital alone on Medical Abstracts, if every hospital trains its update with its
log label mix added to the logits (logit adjustment, as in FedLC, Zhang et al., ICML 2022)?

Validation only: each hospital's training split is cut 80/20 as `medtune benchmark tune` does; no
test split is read. FedAvg is written out (no Flower) over MedTune's own train_local.

    python docs/benchmarks/probes/logit_adjusted_own_mix.py \
        SEED EPSILON LR LOCAL_EPOCHS SIGMA [--references]

SIGMA is the Gaussian noise on each label count used in training (0: exact counts; the counts
would need their own DP release). --references also trains each hospital alone and the plain
federated model. Prints one JSON line: [accuracy, macro-F1] on the hospitals' own validation parts.
Outputs of 2026-11-27: logit_adjusted_own_mix.jsonl (exact counts, with references) and
logit_adjusted_noisy_counts.jsonl (sigma 20, lr 0.003 and 0.01).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import medtune.train as train_module
from medtune.backbone import load_backbone
from medtune.config import federation_passes
from medtune.data import train_test_split
from medtune.evaluation import predict_logits
from medtune.experiments.baselines import splits, train_alone
from medtune.experiments.sweep import read_sweep
from medtune.features import record_inputs
from medtune.federation.overrides import resolve_run_config
from medtune.label_mix import apply_label_mix, label_mix
from medtune.label_prior import initial_model
from medtune.metrics import pool, score_logits
from medtune.run_config import settings_from_run_config

seed, epsilon, lr, local_epochs, sigma = (
    int(sys.argv[1]),
    float(sys.argv[2]),
    float(sys.argv[3]),
    int(sys.argv[4]),
    float(sys.argv[5]),
)
references = "--references" in sys.argv
sweep = read_sweep("medical_abstracts")
overrides = {
    **sweep.run_config,
    "seed": seed,
    "epsilon": epsilon,
    "learning-rate": lr,
    "local-epochs": local_epochs,
}
settings = settings_from_run_config(resolve_run_config(sweep.scenario, overrides))
backbone = load_backbone(settings.model.backbone, settings.model.num_layers, "cpu")
pad = backbone.tokenizer.pad_token_id
cache = Path("runs/probes/feature-cache")
labels = len(settings.data.labels)
rng = np.random.default_rng(seed)
hospitals = []
for split in splits(settings):
    fit, validation = train_test_split(split.train, 0.2, settings.seed + 1)
    counts = np.bincount([r.label for r in fit], minlength=labels) + rng.normal(0.0, sigma, labels)
    hospitals.append(
        {
            "fit": record_inputs(backbone, settings.model, fit, cache),
            "validation": record_inputs(backbone, settings.model, validation, cache),
            "mix": label_mix(
                [r.label for r in fit], labels
            ),  # applied at home, as medtune predict --label-mix does
            "training_mix": np.clip(counts + 1.0, 1.0, None)
            / np.clip(counts + 1.0, 1.0, None).sum(),
        }
    )

logit_bias: dict[str, torch.Tensor | None] = {"value": None}


def adjusted_loss(model, batch, device):
    """MedTune's batch loss with the hospital's log label mix added to the logits."""
    logits = model(batch["inputs"].to(device), batch["attention_mask"].to(device))
    if logit_bias["value"] is not None:
        logits = logits + logit_bias["value"]
    targets = batch["labels"].to(device)
    return F.cross_entropy(logits, targets, reduction="sum") / max(1, targets.shape[0])


train_module._batch_loss = adjusted_loss


def own_validation(model, mix=None):
    scored = []
    for hospital in hospitals:
        logits = predict_logits(model, hospital["validation"], pad, torch.device("cpu"))
        logits = (
            logits if mix is None else apply_label_mix(logits, np.log(hospital[mix]))
        )  # + log pi_h
        scored.append(score_logits(logits, hospital["validation"].labels, settings.data.labels))
    return pool(scored)


def federated(adjusted: bool):
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
            logit_bias["value"] = (
                torch.log(torch.tensor(hospital["training_mix"], dtype=torch.float32))
                if adjusted
                else None
            )
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
    logit_bias["value"] = None
    return model


out = {}
if references:
    alone = []
    for index, hospital in enumerate(hospitals):
        model = initial_model(backbone, settings.model, settings.data, seed=settings.seed)
        train_alone(settings, model, hospital["fit"], pad, seed=seed * 1000 + index)
        logits = predict_logits(model, hospital["validation"], pad, torch.device("cpu"))
        alone.append(score_logits(logits, hospital["validation"].labels, settings.data.labels))
    out["local"] = pool(alone)
    out["fed_plain_mix_own"] = own_validation(federated(adjusted=False), mix="mix")
adjusted_model = federated(adjusted=True)
out["fed_adjusted_asis_own"] = own_validation(adjusted_model)
out["fed_adjusted_mix_own"] = own_validation(adjusted_model, mix="mix")
settings_line = {
    "lr": lr,
    "local_epochs": local_epochs,
    "sigma": sigma,
    "seed": seed,
    "epsilon": epsilon,
}
print(
    json.dumps(settings_line),
    json.dumps({k: [round(v.accuracy, 4), round(v.macro_f1, 4)] for k, v in out.items()}),
)
