"""Resume: it matches an uninterrupted run, and a corrupted checkpoint, missing or corrupted
results, other settings or an edited round stop it, naming the file; a failed write leaves the
previous checkpoint whole.

server/federation.py driven in-process through the fake grid of tests/federation_harness.py.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from federation_harness import (
    CraftedHospital,
    FakeGrid,
    federate,
    first_round_of,
    real_grid,
    run_config,
    task_identity,  # noqa: F401 - the autouse fixture, for every test here
)

from medtune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from medtune.errors import CheckpointError
from medtune.federation.results import RunResults
from medtune.run_config import settings_from_run_config
from server.federation import Federation, checkpoint_dir


@pytest.mark.parametrize("strategy", ["fedmedian", "trimmed-mean", "fedadam"])
def test_resume_matches_an_uninterrupted_run(
    strategy: str, tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    def grid() -> FakeGrid:
        return FakeGrid(
            {i: CraftedHospital(f"hospital_{i}", 100 * i, step=0.05) for i in (1, 2, 3)}
        )

    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    common = {"rounds": 3, "strategy": strategy}
    federate(
        grid(),
        run_config(tiny_backbone_dir, interrupted, hospitals=3, **common, **{"until-round": 2}),
    )
    federate(
        grid(),
        run_config(tiny_backbone_dir, interrupted, hospitals=3, **common, resume=str(interrupted)),
    )
    federate(grid(), run_config(tiny_backbone_dir, straight, hospitals=3, **common))
    resumed = load_checkpoint(checkpoint_dir(interrupted, 3)).arrays
    for name, array in load_checkpoint(checkpoint_dir(straight, 3)).arrays.items():
        np.testing.assert_array_equal(resumed[name], array)


@pytest.fixture
def interrupted_run(tiny_backbone_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """A fedadam run stopped after round 1 (so it has strategy moments), and its resume config."""
    config = run_config(
        tiny_backbone_dir, tmp_path, hospitals=3, rounds=2, strategy="fedadam", **{"until-round": 1}
    )
    federate(FakeGrid({i: CraftedHospital(f"hospital_{i}", 100) for i in (1, 2, 3)}), config)
    return {**config, "until-round": 0, "resume": str(tmp_path)}


@pytest.mark.parametrize("damaged", ["state.safetensors", "meta.json", "strategy.safetensors"])
def test_a_corrupted_checkpoint_stops_the_resume_naming_the_file(
    damaged: str, interrupted_run: dict[str, Any]
) -> None:
    path = checkpoint_dir(Path(interrupted_run["out"]), 1) / damaged
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: corrupted"):
        Federation(FakeGrid({}), settings_from_run_config(interrupted_run))  # type: ignore[arg-type]


def test_an_interrupted_checkpoint_write_resumes_from_the_last_complete_round(
    interrupted_run: dict[str, Any],
) -> None:
    out = Path(interrupted_run["out"])
    half_written = checkpoint_dir(out, 2)  # a crash after state.safetensors, before meta.json
    half_written.mkdir(parents=True)
    (half_written / "state.safetensors").write_bytes(
        (checkpoint_dir(out, 1) / "state.safetensors").read_bytes()
    )
    federation = Federation(FakeGrid({}), settings_from_run_config(interrupted_run))  # type: ignore[arg-type]
    assert federation.first_round == 2


def test_a_failed_write_leaves_the_previous_checkpoint_whole(
    interrupted_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = checkpoint_dir(Path(interrupted_run["out"]), 1)
    before = load_checkpoint(directory)

    def crash(descriptor: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    changed = {name: array + 1 for name, array in before.arrays.items()}
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(
            directory, Checkpoint(changed, before.labels, before.model, "x", "y", before.extra)
        )
    monkeypatch.undo()
    after = load_checkpoint(directory)
    for name, array in before.arrays.items():
        np.testing.assert_array_equal(after.arrays[name], array)
    assert sorted(p.name for p in directory.iterdir()) == [
        "meta.json",
        "state.safetensors",
        "strategy.safetensors",
    ]


def test_corrupted_results_stop_the_resume(interrupted_run: dict[str, Any]) -> None:
    path = Path(interrupted_run["out"]) / "results.json"
    path.write_text(path.read_text()[:50])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: corrupted run results"):
        RunResults.load(Path(interrupted_run["out"]), up_to_round=1)


def test_resuming_without_the_run_history_is_refused(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    files, resume = first_round_of(tiny_backbone_dir, tmp_path, rounds=3)
    (tmp_path / "run" / "results.json").unlink()
    with pytest.raises(
        CheckpointError, match="results.json: missing, so rounds 1..1 of this run have no record"
    ):
        federate(real_grid(files, tmp_path, resume), resume)


def test_resuming_with_other_settings_or_an_edited_round_names_what_differs(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    grid = FakeGrid({i: CraftedHospital(f"hospital_{i}", 100) for i in (1, 2)})
    config = run_config(tiny_backbone_dir, tmp_path, hospitals=2, rounds=3, **{"until-round": 1})
    federate(grid, config)
    resumed = {**config, "until-round": 0, "resume": str(tmp_path)}
    with pytest.raises(
        CheckpointError, match=r"other settings \({'learning-rate': \(0.05, 0.01\)}\)"
    ):
        federate(grid, {**resumed, "learning-rate": 0.01})

    meta = checkpoint_dir(tmp_path, 1) / "meta.json"
    edited = json.loads(meta.read_text())
    edited["round"] = 99
    meta.write_text(json.dumps(edited))
    with pytest.raises(
        CheckpointError, match="says round 99, but the checkpoint is round_001 of a run of 3 rounds"
    ):
        federate(grid, resumed)
