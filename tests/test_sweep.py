"""A tiny benchmark grid (tiny backbone, epsilon 8 and no DP, one seed) through the real runners:
the output files, their columns, and that a rerun skips finished cells."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_recipe

from medtune.errors import ConfigError
from medtune.experiments import sweep as sweep_module
from medtune.experiments.baselines import majority_label, splits
from medtune.experiments.canary_audit import audit_overrides
from medtune.experiments.sweep import SweepConfig, plan_cells, run_sweep
from medtune.federation import simulation as simulate_module
from medtune.federation.overrides import resolve_run_config
from medtune.run_config import settings_from_run_config


def tiny_sweep(backbone: Path) -> SweepConfig:
    return SweepConfig(
        name="tiny",
        scenario="default",
        epsilons=(8.0,),
        seeds=(0,),
        run_config={
            **tiny_recipe(backbone),
            "records-per-hospital": 40,
            "hospitals": 2,
            "rounds": 2,
        },
        axes={},
    )


def test_grid_has_every_baseline_on_the_same_seeds(tiny_backbone_dir: Path) -> None:
    """The cells medtune/experiments/sweep.py documents, for every seed and every value of an axis:
    pooled, majority and zero-shot without DP, and local and federated at each epsilon (ascending)
    and without DP; seed 0's cells all come before seed 1's."""
    grid = {"epsilons": (8.0, 1.0), "seeds": (0, 1), "axes": {"hospitals": (2, 3)}}
    sweep = SweepConfig(**{**tiny_sweep(tiny_backbone_dir).__dict__, **grid})
    every_setting = [
        ("pooled", math.inf),
        ("majority", math.inf),
        ("zero-shot", math.inf),
        ("local", 1.0),
        ("local", 8.0),
        ("local", math.inf),
        ("federated", 1.0),
        ("federated", 8.0),
        ("federated", math.inf),
    ]
    expected = [
        (method, epsilon, seed, (("hospitals", hospitals),))
        for seed in (0, 1)
        for hospitals in (2, 3)
        for method, epsilon in every_setting
    ]
    cells = plan_cells(sweep)
    # none missing, none extra, in order
    assert [(c.method, c.epsilon, c.seed, c.axes) for c in cells] == expected
    assert [c.id for c in cells[:9]] == [
        "pooled_eps-inf_hospitals-2_seed-0",
        "majority_eps-inf_hospitals-2_seed-0",
        "zero-shot_eps-inf_hospitals-2_seed-0",
        "local_eps-1_hospitals-2_seed-0",
        "local_eps-8_hospitals-2_seed-0",
        "local_eps-inf_hospitals-2_seed-0",
        "federated_eps-1_hospitals-2_seed-0",
        "federated_eps-8_hospitals-2_seed-0",
        "federated_eps-inf_hospitals-2_seed-0",
    ]
    assert len({c.id for c in cells}) == len(cells) == 36  # each cell's results file is its own
    for cell in cells:  # each cell runs with its own seed, axis value and epsilon
        overrides = cell.overrides(sweep)
        ran_with = (overrides["seed"], overrides["hospitals"], overrides["epsilon"])
        assert ran_with == (cell.seed, dict(cell.axes)["hospitals"], cell.epsilon)


@pytest.mark.slow
def test_sweep_writes_results_report_and_plot_and_resumes(
    tiny_backbone_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = tiny_sweep(tiny_backbone_dir)
    # An audited sweep (medtune benchmark sweep --audit-canaries): each federated cell is an epsilon
    # audit.
    sweep = SweepConfig(
        **{
            **sweep.__dict__,
            "run_config": {**sweep.run_config, **audit_overrides(100, "hospital_1", "white-box")},
        }
    )
    rows = run_sweep(sweep, tmp_path, progress=False)
    assert len(rows) == 7

    summary = pd.read_csv(tmp_path / "results.csv")
    for column in (
        "method",
        "epsilon",
        "seeds",
        "accuracy_mean",
        "accuracy_std",
        "macro_f1_mean",
        "worst_hospital_accuracy_mean",
        "epsilon_spent_mean",
        "rounds_mean",
        "wall_seconds_mean",
        "bytes_per_hospital_round_mean",
        "bytes_total_mean",
    ):
        assert column in summary.columns, column
    by_cell = {(row.method, float(row.epsilon)): row for row in summary.itertuples()}
    assert set(by_cell) == {
        ("pooled", math.inf),
        ("majority", math.inf),
        ("zero-shot", math.inf),
        ("local", 8.0),
        ("local", math.inf),
        ("federated", 8.0),
        ("federated", math.inf),
    }
    for row in summary.itertuples():
        assert 0.0 <= row.accuracy_mean <= 1.0
    assert 0 < by_cell[("federated", 8.0)].epsilon_spent_mean <= 8.0
    assert (
        0
        <= by_cell[("federated", 8.0)].epsilon_audited_mean
        <= by_cell[("federated", 8.0)].epsilon_spent_mean
    )
    # only federated cells are audit runs
    assert math.isnan(by_cell[("local", 8.0)].epsilon_audited_mean)
    assert 0 < by_cell[("local", 8.0)].epsilon_spent_mean <= 8.0
    assert by_cell[("federated", 8.0)].rounds_mean == 2
    assert by_cell[("federated", 8.0)].bytes_per_hospital_round_mean > 0
    # nothing leaves a hospital that trains alone
    assert by_cell[("local", 8.0)].bytes_total_mean == 0

    record = json.loads((tmp_path / "results.json").read_text())
    assert len(record["runs"]) == 7 and len(record["summary"]) == 7
    report = (tmp_path / "report.md").read_text()
    assert by_cell[("zero-shot", math.inf)].epsilon_spent_mean == 0.0  # no record trained anything
    assert "| zero-shot | — |" in report
    caches = list((tmp_path / "feature-cache").iterdir())  # one cache for every cell, none per run
    assert caches and not list(
        (tmp_path / "runs" / "federated_eps-8_seed-0" / "sites").glob("*/features")
    )
    assert "accuracy_vs_epsilon.png" in report and "| federated | 8 |" in report
    assert (tmp_path / "accuracy_vs_epsilon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    federated = by_cell[("federated", 8.0)]
    assert (
        0.0 <= federated.own_mix_accuracy_mean <= 1.0
        and 0.0 <= federated.own_mix_macro_f1_mean <= 1.0
    )
    # only the shared model gets a site's mix
    assert math.isnan(by_cell[("local", 8.0)].own_mix_accuracy_mean)
    assert "federated + own label mix" in report and "ε audited (lower bound)" in report

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run ran again")

    # A federated run that finished before its cell file was written is scored again, not
    # re-simulated.
    cell = tmp_path / "cells" / "federated_eps-8_seed-0.json"
    scored = json.loads(cell.read_text())
    cell.unlink()
    with monkeypatch.context() as patched:
        patched.setattr("medtune.federation.simulation.simulate", must_not_run)
        rows = run_sweep(sweep, tmp_path, progress=False)
    rescored = json.loads(cell.read_text())
    assert {k: v for k, v in rescored.items() if k != "wall_seconds"} == {
        k: v for k, v in scored.items() if k != "wall_seconds"
    }

    # ... but a run made with other settings (here: its checkpoint says another learning rate) is
    # not.
    meta = tmp_path / "runs" / "federated_eps-8_seed-0" / "checkpoints" / "round_002" / "meta.json"
    record = json.loads(meta.read_text())
    record["config"]["learning-rate"] = 0.5
    meta.write_text(json.dumps(record))
    cell.unlink()
    simulated = []
    real_simulate = simulate_module.simulate
    monkeypatch.setattr(
        simulate_module, "simulate", lambda *a, **k: simulated.append(a) or real_simulate(*a, **k)
    )
    rows = run_sweep(sweep, tmp_path, progress=False)
    assert len(simulated) == 1

    monkeypatch.setattr(sweep_module, "run_cell", must_not_run)
    assert run_sweep(sweep, tmp_path, progress=False) == rows

    # Cells of an edited grid must not be mixed with these: the same output directory is refused.
    edited = SweepConfig(
        **{**sweep.__dict__, "run_config": {**sweep.run_config, "learning-rate": 0.01}}
    )
    with pytest.raises(ConfigError, match="another sweep grid"):
        run_sweep(edited, tmp_path, progress=False)


def test_a_sweep_file_with_a_bad_epsilon_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('epsilons = [1.0, "lots"]\n')
    with pytest.raises(ConfigError, match="epsilon 'lots' is not a number"):
        sweep_module.read_sweep(str(path))


def test_majority_label_scores_each_hospitals_own_label_mix(tmp_path: Path) -> None:
    settings = settings_from_run_config(
        resolve_run_config(
            None,
            {
                "hospitals": 3,
                "records-per-hospital": 60,
                "dirichlet-alpha": 0.3,
                "out": str(tmp_path),
            },
        )
    )
    result = majority_label(settings)
    for split in splits(settings):
        counts = Counter(r.label for r in split.train)
        top = max(counts.values())
        label = min(i for i, c in counts.items() if c == top)
        expected = sum(r.label == label for r in split.test) / len(split.test)
        assert result.per_hospital[split.name].accuracy == pytest.approx(expected)
    assert all(math.isinf(e) for e in result.epsilon_spent.values())


def test_recipes_form_an_axis_whose_cells_carry_every_key_of_their_recipe(
    tiny_backbone_dir: Path,
) -> None:
    recipes = {
        "late": {"prompt-layer": 5},
        "shipped": {"num-layers": 2, "max-length": 16, "prompt-layer": 0},
    }
    sweep = SweepConfig(**{**tiny_sweep(tiny_backbone_dir).__dict__, "recipes": recipes})
    cells = plan_cells(sweep)
    assert {dict(c.axes)["recipe"] for c in cells} == {"late", "shipped"} and len(cells) == 2 * 7
    shipped = next(
        c for c in cells if dict(c.axes)["recipe"] == "shipped" and c.method == "federated"
    )
    overrides = shipped.overrides(sweep)
    assert (overrides["num-layers"], overrides["max-length"], overrides["prompt-layer"]) == (
        2,
        16,
        0,
    )
    assert "recipe" not in overrides and sweep.axis_names == ["recipe"]
    with pytest.raises(ConfigError, match="recipe 'bad': unknown run-config key"):
        SweepConfig(**{**sweep.__dict__, "recipes": {"bad": {"prompt-layers": 5}}})
    with pytest.raises(
        ConfigError, match=r"\['prompt-layer'\] are set both by \[axes\] and by \[recipes\]"
    ):
        SweepConfig(**{**sweep.__dict__, "axes": {"prompt-layer": (0, 5)}})


@pytest.mark.parametrize(
    ("axis", "values", "message"),
    [
        (
            "prompt-length",
            (4, 200),
            "prompt-length) 200 = 232 tokens exceeds the 160 positions of the backbone",
        ),
        ("prompt-layer", (3, 9), "prompt-layer) = 9 is outside 0..6"),
        ("records-per-hospital", (40, 10), "synth.mean_records must be at least 20, got 10"),
    ],
)
def test_an_axis_value_out_of_range_is_refused_before_any_cell_runs(
    axis: str,
    values: tuple,
    message: str,
    tiny_backbone_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cell ran before every cell's settings were checked")

    monkeypatch.setattr(sweep_module, "run_cell", must_not_run)
    sweep = SweepConfig(**{**tiny_sweep(tiny_backbone_dir).__dict__, "axes": {axis: values}})
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        run_sweep(sweep, out, progress=False)
    # the first cell of that value
    assert f"cell pooled_eps-inf_{axis}-{values[1]}_seed-0" in str(refused.value)
    assert not out.exists()  # no grid file, no feature cache, no cell
