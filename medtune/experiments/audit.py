"""`medtune audit`: an empirical membership-inference test of a trained prompt and head.

DP promises that no single record changes what the model does by much. This checks it in
practice with the loss-threshold attack (Yeom et al., 2018): a record the model trained on tends
to have a lower loss than one it never saw, so an attacker scores each record by its negative
loss. Members are a hospital's training records, non-members its held-out test records (drawn
from the same hospital, so only membership differs). Reported:

- AUC of the attack score over members vs non-members: 0.5 is chance, 1.0 total leakage;
- the true-positive rate at 1% false positives (Carlini et al., 2022): whether *some* records are
  exposed with confidence, which an average-case AUC can hide.

An overfit model without DP leaks measurably; DP at a small epsilon brings the attack to chance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medtune.errors import ConfigError
from medtune.evaluation import predict_logits
from medtune.features import RecordInputs
from medtune.model import PromptClassifier


@dataclass(frozen=True)
class AuditResult:
    auc: float
    tpr_at_1pct_fpr: float
    members: int
    non_members: int
    member_loss: float  # mean cross-entropy on the training records
    non_member_loss: float  # mean cross-entropy on the held-out records

    def to_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def per_record_losses(
    model: PromptClassifier, dataset: RecordInputs, pad_token_id: int, device: torch.device
) -> np.ndarray:
    logits = predict_logits(model, dataset, pad_token_id, device)
    return F.cross_entropy(logits, dataset.labels, reduction="none").numpy()


def attack_auc(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """P(a random member scores above a random non-member), ties counting half (Mann-Whitney U)."""
    above = (member_scores[:, None] > non_member_scores[None, :]).mean()
    ties = (member_scores[:, None] == non_member_scores[None, :]).mean()
    return float(above + 0.5 * ties)


def tpr_at_fpr(
    member_scores: np.ndarray, non_member_scores: np.ndarray, fpr: float = 0.01
) -> float:
    """Members flagged when the threshold lets at most `fpr` of non-members through."""
    ordered = np.sort(non_member_scores)[::-1]
    allowed = int(np.floor(fpr * len(ordered)))
    # Flag only scores above the (allowed+1)-th highest non-member score: at most `allowed` false
    # positives.
    threshold = ordered[allowed] if allowed < len(ordered) else -np.inf
    return float((member_scores > threshold).mean())


def audit_model(
    model: PromptClassifier,
    members: RecordInputs,
    non_members: RecordInputs,
    pad_token_id: int,
    device: torch.device,
) -> AuditResult:
    """The loss-threshold attack on one model, members against non-members."""
    if len(members) == 0 or len(non_members) == 0:
        raise ConfigError(
            f"an audit needs members and non-members; got {len(members)} and {len(non_members)}"
        )
    member_losses = per_record_losses(model, members, pad_token_id, device)
    non_member_losses = per_record_losses(model, non_members, pad_token_id, device)
    return AuditResult(
        auc=attack_auc(-member_losses, -non_member_losses),
        tpr_at_1pct_fpr=tpr_at_fpr(-member_losses, -non_member_losses),
        members=len(members),
        non_members=len(non_members),
        member_loss=float(member_losses.mean()),
        non_member_loss=float(non_member_losses.mean()),
    )


def audit_run(out: Path, hospital: str) -> AuditResult:
    """Attack a simulated federation's latest global prompt and head with one hospital's records."""
    from medtune.backbone import resolve_device
    from medtune.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
    from medtune.data import train_test_split
    from medtune.features import record_inputs
    from medtune.federation.partitions import simulated_hospital
    from medtune.hospitals import hospital_name
    from medtune.run_config import settings_from_run_config

    checkpoint = load_checkpoint(find_checkpoint(out))
    if "round" not in checkpoint.extra:  # only a federation's checkpoints are numbered by round
        raise ConfigError(
            f"{out}: a `medtune train` run (one site, no federation); audit attacks a simulated "
            "federation's global model, so give it a `medtune simulate` out directory"
        )
    settings = settings_from_run_config(checkpoint.extra["config"])
    names = [hospital_name(i) for i in range(settings.source.hospitals)]
    if hospital not in names:
        raise ConfigError(f"{out}: no hospital '{hospital}' in this run; its hospitals are {names}")
    records = simulated_hospital(settings, names.index(hospital)).records
    train, test = train_test_split(records, settings.data.test_fraction, settings.seed)
    # The backbone is loaded once, and its weights hash checked against the checkpoint's.
    _, model, backbone = model_from_checkpoint(out, device=settings.train.device, read=checkpoint)
    return audit_model(
        model,
        record_inputs(backbone, checkpoint.model, train),
        record_inputs(backbone, checkpoint.model, test),
        backbone.tokenizer.pad_token_id,
        resolve_device(settings.train.device),
    )
