"""`medtune audit --canaries M`: an empirical lower bound on one hospital's epsilon, from one
simulated run.

The run is the federation being audited (its scenario and run config), with M canaries of each kind
planted at the audited hospital (medtune/canaries.py) and every received update kept
(`keep-updates`). Then:

- **white box**: each gradient canary is scored by what DP's own adversary reads at the audited
  hospital: every step's released (noised) gradient at the canary's coordinate, less the part of
  the other records, whose clipped gradients it knows; summed over all the hospital's steps
  (`ledger.canary-steps.npy` beside the site's ledger, written during the run);
- **coordinator's view**: the same canaries scored by the descent of the hospital's updates along
  their directions, summed over rounds: exactly what the coordinator receives
  (`updates/round_NNN/`). Weaker (Adam reshapes each step and the records' gradients stay in), it
  says what a curious coordinator could learn;
- **black box**: each input canary is scored by minus its loss under the final global model.

Each score list goes to the one-run test (medtune/epsilon_audit.py), which certifies, at 95%
confidence, an epsilon the mechanism cannot be below. It is printed and written to `audit.json`
beside the hospital's ledger epsilon; a bound above the ledger's means the noise, the sampling or
the accounting is broken. The run stays in its out directory, so `medtune audit --score OUT` scores
it again from what it kept.

Under secure aggregation the coordinator never sees one hospital's update, so its view is not
audited; white box and black box still are. A deployed run cannot be audited: the auditor must
plant the canaries and read the updates, which only a simulation of the same federation allows.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from medtune.canaries import (
    GradientCanaries,
    audited_input_canaries,
    canary_steps_path,
    included_bits,
    read_canary_steps,
)
from medtune.defaults import run_defaults
from medtune.epsilon import read_epsilon
from medtune.epsilon_audit import EpsilonBound, audit_scores
from medtune.errors import ConfigError
from medtune.federation.results import RESULTS_FILE, SENT_STATE, updates_folder
from medtune.files import atomic_write_json, read_json
from medtune.hospitals import hospital_name, simulated_ledger_path
from medtune.ledger_file import read_ledger
from medtune.run_config import RunSettings, settings_from_run_config
from medtune.state import ExchangedStateSpec

AUDIT_FILE = "audit.json"
# The report's audits, as a reader names them: every step seen (DP's adversary), the coordinator's
# rounds, the final model.
MODES = {
    "white_box": "white box",
    "coordinator_view": "coordinator's view",
    "black_box": "black box",
}
COORDINATOR_VIEW_REFUSED = (
    "coordinator's view not audited: secure aggregation hides each hospital's update from it"
)


def audit_overrides(canaries: int, hospital: str, mode: str) -> dict[str, Any]:
    """What an audit run adds to the audited federation's run config."""
    if canaries < 2:
        raise ConfigError(
            f"--canaries must be at least 2 (an audit compares canaries in and out), got {canaries}"
        )
    return {
        "audit-canaries": canaries,
        "audit-hospital": hospital,
        "audit-mode": mode,
        "keep-updates": True,
    }


def check_audit_settings(settings: RunSettings) -> None:
    """Refused before the run starts: a hospital that is not in the federation, or more black-box
    canaries than its training records."""
    names = [hospital_name(i) for i in range(settings.source.hospitals)]
    if settings.audit.hospital not in names:
        raise ConfigError(
            f"--hospital {settings.audit.hospital!r} is not in this federation; its hospitals are "
            f"{names}"
        )
    if settings.audit.black_box:
        from medtune.data import train_test_split
        from medtune.federation.partitions import simulated_hospital

        records = simulated_hospital(settings, names.index(settings.audit.hospital)).records
        train, _ = train_test_split(records, settings.data.test_fraction, settings.seed)
        if settings.audit.canaries > len(train):
            raise ConfigError(
                f"--canaries {settings.audit.canaries} is more than {settings.audit.hospital}'s "
                f"{len(train)} training records: black-box canaries would outnumber them; give at "
                "most that many, or --mode white-box"
            )


def run_audit(
    scenario: str | None, overrides: dict[str, Any], canaries: int, hospital: str, mode: str
) -> dict[str, Any]:
    """Simulate the federation with canaries at `hospital`, then score it."""
    from medtune.federation.overrides import run_settings
    from medtune.federation.simulation import simulate

    settings = run_settings(scenario, {**overrides, **audit_overrides(canaries, hospital, mode)})
    check_audit_settings(settings)
    results = simulate(settings)
    return score_audit(results.parent)


def _settings(out: Path) -> RunSettings:
    results = out / RESULTS_FILE
    if not results.is_file():
        raise ConfigError(
            f"{out}: no {RESULTS_FILE}; give the out directory of a finished `medtune audit "
            "--canaries` run"
        )
    # A run from before the audit keys existed reads as having none (the shipped defaults fill
    # them).
    settings = settings_from_run_config({**run_defaults(), **read_json(results)["config"]})
    if settings.audit.canaries == 0:
        raise ConfigError(
            f"{out}: a run without canaries cannot be audited; an epsilon audit needs a simulation "
            "of the federation with canaries planted and every update kept: run `medtune audit "
            "--canaries M` with its run config (a deployed run's hospitals plant no canaries, and "
            "its auditor sees no single update)"
        )
    return settings


def _ledger_epsilon(settings: RunSettings, out: Path) -> float:
    path = simulated_ledger_path(out, settings.audit.hospital)
    ledger = read_ledger(path)
    if ledger is None:
        raise ConfigError(
            f"{out}: the audited hospital's ledger {path} is missing; the run cannot be scored"
        )
    return read_epsilon(ledger.epsilon, str(path), spent=True)


def white_box_scores(settings: RunSettings, out: Path) -> np.ndarray:
    """Each gradient canary's summed observation over every step the audited hospital took
    (medtune/canaries.py)."""
    path = canary_steps_path(simulated_ledger_path(out, settings.audit.hospital))
    if not path.is_file():
        raise ConfigError(
            f"{out}: no step observations of {settings.audit.hospital} ({path}); it never trained "
            "in this run"
        )
    steps = read_canary_steps(path)
    if steps.ndim != 2 or steps.shape[1] != settings.audit.canaries:
        raise ConfigError(
            f"{path}: expected (steps, {settings.audit.canaries}) observations, found shape "
            f"{steps.shape}"
        )
    return steps.sum(axis=0)


def coordinator_scores(settings: RunSettings, out: Path, canaries: GradientCanaries) -> np.ndarray:
    """Each gradient canary's summed descent over the rounds in which the coordinator got the
    hospital's update."""
    descents = []
    for server_round in range(1, settings.federation.rounds + 1):
        folder = updates_folder(out, server_round)
        reply = folder / f"{settings.audit.hospital}.safetensors"
        if reply.is_file():
            sent, received = load_file(str(folder / SENT_STATE)), load_file(str(reply))
            descents.append({name: sent[name].astype(np.float64) - received[name] for name in sent})
    if not descents:
        raise ConfigError(
            f"{out}: no kept update of {settings.audit.hospital}; it never trained in this run"
        )
    return canaries.scores(descents)


def black_box_scores(settings: RunSettings, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """Minus each input canary's loss under the final global model, and which canaries were in."""
    from medtune.backbone import resolve_device
    from medtune.checkpoint import model_from_checkpoint
    from medtune.experiments.audit import per_record_losses
    from medtune.features import record_inputs

    checkpoint, model, backbone = model_from_checkpoint(out, device=settings.train.device)
    count, hospital = settings.audit.canaries, settings.audit.hospital
    records = audited_input_canaries(settings, backbone)
    dataset = record_inputs(backbone, checkpoint.model, records)
    losses = per_record_losses(
        model, dataset, backbone.tokenizer.pad_token_id, resolve_device(settings.train.device)
    )
    return -losses, included_bits(count, settings.seed, hospital, "input")


def score_audit(out: Path) -> dict[str, Any]:
    """The audits of a finished canary run, from what it kept; written to OUT/audit.json."""
    from medtune.backbone import load_backbone

    settings = _settings(out)
    ledger_epsilon = _ledger_epsilon(settings, out)
    delta = settings.privacy.delta
    report: dict[str, Any] = {
        "hospital": settings.audit.hospital,
        "canaries": settings.audit.canaries,
        "ledger_epsilon": ledger_epsilon,
        "delta": delta,
    }
    if settings.audit.white_box:
        included = included_bits(
            settings.audit.canaries, settings.seed, settings.audit.hospital, "gradient"
        )
        report["white_box"] = asdict(audit_scores(white_box_scores(settings, out), included, delta))
        if settings.federation.secure_aggregation:
            report["coordinator_view"] = {"refused": COORDINATOR_VIEW_REFUSED}
        else:
            backbone = load_backbone(settings.model.backbone, settings.model.num_layers, "cpu")
            spec = ExchangedStateSpec(
                settings.model.prompt_length, backbone.hidden_size, len(settings.data.labels)
            )
            canaries = GradientCanaries.draw(
                settings.audit.canaries,
                spec,
                settings.seed,
                settings.audit.hospital,
                clip=settings.privacy.max_grad_norm,
                sample_rate=1.0,
            )
            scores = coordinator_scores(settings, out, canaries)
            report["coordinator_view"] = asdict(audit_scores(scores, canaries.included, delta))
    if settings.audit.black_box:
        scores, included = black_box_scores(settings, out)
        report["black_box"] = asdict(audit_scores(scores, included, delta))
    atomic_write_json(out / AUDIT_FILE, report)
    return report


def audited_epsilon(report: dict[str, Any]) -> float:
    """A sweep's "epsilon audited" column: the white-box bound when it ran, else the black-box one.
    One mode chosen in advance, not the larger of several, keeps the column's 95% confidence."""
    return next(
        report[mode]["epsilon"]
        for mode in ("white_box", "black_box")
        if "epsilon" in report.get(mode, {})
    )


def audit_lines(report: dict[str, Any]) -> list[str]:
    """The audit as a reader wants it: each mode's bound beside the ledger's epsilon, and a
    verdict."""
    ledger = report["ledger_epsilon"]
    kinds = " and ".join(MODES[mode] for mode in MODES if mode in report)
    lines = [
        f"{report['hospital']}: ledger epsilon {ledger:.3g} (delta {report['delta']:g}), "
        f"{report['canaries']} canaries per audit ({kinds})"
    ]
    for mode, name in MODES.items():
        if mode not in report:
            continue
        found = report[mode]
        if "refused" in found:
            lines.append(found["refused"])
            continue
        result = EpsilonBound(**found)
        lines.append(
            f"{name}: epsilon >= {result.epsilon:.3f} at {result.confidence:.0%} confidence "
            f"({result.v} of {result.r} guesses right, k = {result.k} each side, m = {result.m})"
        )
        if result.epsilon > ledger and not math.isinf(ledger):
            lines.append(
                f"audited lower bound {result.epsilon:.3f} exceeds the ledger's epsilon "
                f"{ledger:.3g}: the mechanism or the accounting is wrong"
            )
    return lines
