"""A stop signal (Ctrl-C, SIGTERM): nothing of the interrupted round is recorded, and a stop after
the sites trained costs them no budget on resume (tests/federation_harness.py drives the
federation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from federation_harness import (
    CraftedHospital,
    FakeGrid,
    RealHospital,
    federate,
    ledger_path,
    real_grid,
    run_config,
    site_files,
    task_identity,  # noqa: F401 - the autouse fixture, for every test here
)
from flwr.app import Message, MessageType


class StopsTheRunInRound2(CraftedHospital):
    """Ctrl-C arrives while round 2's replies are coming in."""

    def __call__(self, message: Message) -> Message:
        from medtune.stopping import STOP

        if int(message.content["config"].get("server-round", 0)) == 2:
            STOP.set()
        return super().__call__(message)


def test_a_stop_signal_records_nothing_of_the_interrupted_round(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    from medtune.stopping import STOP, Interrupted

    nodes = {1: CraftedHospital("hospital_1", 100), 2: StopsTheRunInRound2("hospital_2", 100)}
    config = run_config(tiny_backbone_dir, tmp_path, hospitals=2, rounds=3)
    try:
        with pytest.raises(Interrupted, match="stopped by a signal before this round was recorded"):
            federate(FakeGrid(nodes), config)
    finally:
        STOP.clear()
    recorded = json.loads((tmp_path / "results.json").read_text())
    # round 2 left no trace: --resume repeats it
    assert [r["round"] for r in recorded["rounds"]] == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round_001"]


class StopsAfterTraining(RealHospital):
    """Ctrl-C lands after this site trained round 2 and sent its update, before the coordinator
    recorded it."""

    def __call__(self, message: Message) -> Message:
        from medtune.stopping import STOP

        reply = super().__call__(message)
        if (
            message.metadata.message_type == MessageType.TRAIN
            and int(message.content["config"]["server-round"]) == 2
        ):
            STOP.set()
        return reply


def test_a_stop_after_the_sites_trained_costs_no_budget(
    tiny_backbone_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGINT in round 2 of 3 and --resume: all 3 rounds complete, and every ledger equals a
    straight run's."""
    from medtune.stopping import STOP, Interrupted

    caplog.set_level("INFO", logger="medtune.site")

    files = site_files(tmp_path)
    config = run_config(tiny_backbone_dir, tmp_path / "run", hospitals=3, rounds=3, epsilon=8.0)
    grid = real_grid(files, tmp_path, config)
    grid.nodes[3] = StopsAfterTraining(3, grid.nodes[3].context.node_config, config)
    try:
        with pytest.raises(Interrupted):
            federate(grid, config)
    finally:
        STOP.clear()
    resumed = federate(
        real_grid(files, tmp_path, config), {**config, "resume": str(tmp_path / "run")}
    )
    straight_dir = tmp_path / "straight"
    straight_config = {**config, "out": str(straight_dir / "run")}
    federate(real_grid(files, straight_dir, straight_config), straight_config)

    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3] and all(
        r["aggregated"] for r in resumed["rounds"]
    )
    assert (
        "hospital_3: round 2 was trained from this global state before; its update is sent again"
        in caplog.text
    )
    for i in (1, 2, 3):
        stopped, uninterrupted = (
            json.loads(ledger_path(base, i).read_text()) for base in (tmp_path, straight_dir)
        )
        assert stopped["steps"] == uninterrupted["steps"] and stopped["trained_rounds"] == [1, 2, 3]
        assert stopped["epsilon_spent"] == uninterrupted["epsilon_spent"] <= 8.0
