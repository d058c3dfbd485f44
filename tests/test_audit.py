"""Membership inference on a tiny model: an overfit non-private model leaks, DP at epsilon 1 does
not."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from medtune.config import ModelConfig, PrivacyConfig, TrainConfig
from medtune.data import Record
from medtune.experiments.audit import attack_auc, audit_model, tpr_at_fpr
from medtune.features import record_inputs
from medtune.model import PromptClassifier
from medtune.train import new_ledger, train_local

WORDS = (
    "fever cough rash pain nausea chest abdomen headache swelling fracture wound murmur glucose"
).split()


def _notes(count: int, seed: int) -> list[Record]:
    """Distinct notes with random labels: only memorising them lowers their loss."""
    rng = random.Random(seed)
    return [Record(" ".join(rng.choices(WORDS, k=12)), rng.randrange(5)) for _ in range(count)]


def test_attack_scores_behave_at_the_extremes() -> None:
    assert attack_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert attack_auc(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.5
    non_members = np.linspace(0, 1, 200)
    # only the score above every non-member's top 1%
    assert tpr_at_fpr(np.array([2.0, 0.5]), non_members) == 0.5


@pytest.fixture(scope="module")
def audited(tiny_backbone):
    """The attack on one model trained without DP, and on three trained at epsilon = 1 (seeds 0, 1,
    2): one run's AUC on 64 + 64 notes varies by about 0.06 from seed to seed."""
    torch.manual_seed(0)
    members, non_members = _notes(64, seed=1), _notes(64, seed=2)
    config = ModelConfig(num_layers=None, prompt_length=4, max_length=24)
    pad = tiny_backbone.tokenizer.pad_token_id
    member_set = record_inputs(tiny_backbone, config, members)
    non_member_set = record_inputs(tiny_backbone, config, non_members)
    train, passes = TrainConfig(batch_size=16, learning_rate=0.05, device="cpu"), 60
    results = {}
    for epsilon, seeds in ((math.inf, (0,)), (1.0, (0, 1, 2))):
        results[epsilon] = []
        for seed in seeds:
            model = PromptClassifier(tiny_backbone, config, num_labels=5, seed=0)
            ledger = new_ledger(
                PrivacyConfig(epsilon=epsilon), len(member_set), train.batch_size, passes
            )
            train_local(
                model, member_set, ledger, train, pad, seed=seed, passes=passes, progress=False
            )
            results[epsilon].append(
                audit_model(model, member_set, non_member_set, pad, torch.device("cpu"))
            )
    return results


def test_an_overfit_model_without_dp_leaks_membership(audited) -> None:
    (leaky,) = audited[math.inf]
    assert leaky.member_loss < leaky.non_member_loss
    assert leaky.auc > 0.7


def test_dp_at_epsilon_one_brings_the_attack_near_chance(audited) -> None:
    auc = float(np.mean([result.auc for result in audited[1.0]]))
    # No attack on an epsilon-DP mechanism beats AUC e^eps / (1 + e^eps) (0.73 at eps = 1) on
    # average.
    assert auc < math.exp(1.0) / (1 + math.exp(1.0))
    assert abs(auc - 0.5) < 0.1
    assert auc < audited[math.inf][0].auc - 0.15


def test_auditing_a_single_site_training_run_says_what_audit_needs(
    tmp_path, tiny_backbone_dir, capsys
) -> None:
    from medtune.cli import main

    notes = tmp_path / "notes.csv"
    notes.write_text(
        "text,label\n" + "chest pain,cardiology\nwheezing,pulmonology\n" * 6, encoding="utf-8"
    )
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(notes),
                "--backbone",
                str(tiny_backbone_dir),
                "--out",
                str(run),
                "--epochs",
                "1",
                "--prompt-layer",
                "6",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["audit", "--run", str(run), "--hospital", "hospital_1"]) == 2
    err = capsys.readouterr().err
    assert "a `medtune train` run (one site, no federation)" in err and "Traceback" not in err
