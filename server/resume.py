"""Resuming a run from its last complete checkpoint, or refusing to, naming why.

A resumed run must be the same run: the same settings (only `RESUMABLE_KEYS` may change), the same
backbone weights (`Backbone.fingerprint`) and labels, a checkpoint whose round matches its folder,
and the whole results.json history up to that round. Anything else stops here with a
CheckpointError, before any hospital is asked to spend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.serverapp.strategy import FedAvg

from medtune.checkpoint import META_FILE, check_resume_location, find_checkpoint, load_checkpoint
from medtune.errors import CheckpointError
from medtune.federation.results import RESULTS_FILE, RunResults
from medtune.files import json_ready
from medtune.run_config import RunSettings
from server.strategy import build_strategy, restore_strategy_state

# What a resumed run may set differently: where it is and how far it goes, and how long the
# coordinator waits for replies; nothing that changes what a hospital trains or spends.
RESUMABLE_KEYS = {"resume", "until-round", "rounds", "out", "round-timeout"}


def changed_settings(original: dict, now: dict) -> dict[str, tuple]:
    """Run-config keys whose value differs between the run's start and its resumption: {key: (then,
    now)}."""
    keys = (set(original) | set(now)) - RESUMABLE_KEYS
    # `original` was read back from JSON, where inf is "inf": compare both as they are written.
    return {
        key: (original.get(key), now.get(key))
        for key in sorted(keys)
        if json_ready(original.get(key)) != json_ready(now.get(key))
    }


@dataclass(frozen=True)
class Resumed:
    """Where a resumed run starts: the checkpoint's global state, the strategy with its saved
    moments, the first round still to run, the history of the rounds done, and the line that says
    so."""

    arrays: dict[str, np.ndarray]
    strategy: FedAvg
    first_round: int
    results: RunResults
    event: str


def resume_run(resume: Path, settings: RunSettings, backbone_hash: str) -> Resumed:
    """The run `settings` describe, continued from the last complete checkpoint under `resume`.

    `backbone_hash` is the loaded backbone's `Backbone.fingerprint`: a checkpoint made on other
    weights is refused.
    """
    strategy = build_strategy(settings.federation, settings.train.learning_rate)
    path = find_checkpoint(resume)
    check_resume_location(settings.out, path)
    checkpoint = load_checkpoint(path)
    try:
        done = int(checkpoint.extra["round"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path / META_FILE}: corrupted metadata (no round number)") from None
    if path.name != f"round_{done:03d}" or not 1 <= done <= settings.federation.rounds:
        raise CheckpointError(
            f"{path / META_FILE}: says round {done}, but the checkpoint is {path.name} of a "
            f"run of {settings.federation.rounds} rounds; the metadata was edited or copied "
            "from another run"
        )
    changed = changed_settings(dict(checkpoint.extra.get("config", {})), settings.run_config)
    if changed:
        raise CheckpointError(
            f"{path}: this run was started with other settings ({changed}); resume with the "
            "run's original --run-config (only rounds, until-round and round-timeout may change)"
        )
    if checkpoint.backbone_hash != backbone_hash or checkpoint.labels != settings.data.labels:
        raise CheckpointError(
            f"{path}: made with backbone {checkpoint.backbone_name} (hash "
            f"{checkpoint.backbone_hash[:12]}) and labels {list(checkpoint.labels)}; this run "
            f"has hash {backbone_hash[:12]} and labels {list(settings.data.labels)}"
        )
    restore_strategy_state(strategy, path)
    if not (settings.out / RESULTS_FILE).is_file():
        raise CheckpointError(
            f"{settings.out / RESULTS_FILE}: missing, so rounds 1..{done} of this run have no "
            "record; restore it to resume (a resumed run must continue the whole history, "
            f"never start it at round {done + 1})"
        )
    results = RunResults.load(settings.out, up_to_round=done)
    return Resumed(
        arrays=dict(checkpoint.arrays),
        strategy=strategy,
        first_round=done + 1,
        results=RunResults(settings.run_config, results.rounds, results.events),
        event=f"resumed from {path} after round {done}",
    )
