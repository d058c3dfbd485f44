"""`medtune benchmark sweep`: what privacy costs, as a grid of runs on the same hospitals and
splits.

A sweep file (`simulations/benchmarks/<name>.toml`) names a scenario, the privacy axis, the seeds,
run-config overrides for every cell, and optional axes (any run-config key with a list of values,
such as `hospitals`, `dirichlet-alpha`, `prompt-length` or `num-layers`), and optional named recipes
(`[recipes.<name>]`: several run-config keys that only make sense together, such as the shipped
2-layer/64-token cut against the full encoder with a late prompt; they form the axis `recipe`), and
optional `[no-dp]` overrides for every model trained without DP (federated and local at inf,
pooled): DP-SGD's clipping and noise tolerate a learning rate that overfits without them, so
the non-private reference gets its own settings, chosen on validation (`medtune benchmark tune
--epsilon inf`), rather than the private recipe's.
For every combination of axes and every seed it runs, on identical hospitals and splits:

- federated: the real Flower simulation (`medtune simulate`) at every epsilon, and without DP;
- local: each hospital alone, at every epsilon and without DP (same passes over its data);
- pooled: every hospital's records in one place, without DP (the ceiling);
- majority: each hospital predicting its most frequent training label (no model; the floor that
  a hospital's own skewed test split hands out for free);
- zero-shot: no training, each record matched to the nearest label-name embedding (the prior the
  head starts from; what the encoder knows before any record is used).

Federated runs are also scored as a hospital would use the global model at home: with its own
label mix applied (medtune/label_mix.py), on its own test split ("own_mix_*").

Each finished run is written to `cells/<id>.json` at once, so an interrupted sweep resumes and
skips finished runs. The summary (mean and std over seeds) lands in results.csv, results.json,
report.md and accuracy_vs_epsilon.png.
"""

from __future__ import annotations

import itertools
import math
import re
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medtune.epsilon import NO_DP, read_epsilon, show_epsilon
from medtune.errors import ConfigError, MedTuneError
from medtune.files import atomic_write_json, json_ready, read_json
from medtune.run_config import RunSettings, check_keys, named_toml, shipped_folder

SWEEP_DIR = shipped_folder("benchmarks")
SWEEP_KEYS = {"name", "scenario", "epsilons", "seeds", "run-config", "axes", "recipes", "no-dp"}
RECIPE_AXIS = "recipe"
TRAINED_METHODS = ("federated", "local", "pooled")
GRID_FILE = "grid.json"  # what every cell in an output directory was run with


@dataclass(frozen=True)
class SweepConfig:
    """One benchmark grid. `run_config` applies to every cell; `axes` and `recipes` multiply the
    grid."""

    name: str
    scenario: str
    epsilons: tuple[float, ...]
    seeds: tuple[int, ...]
    run_config: dict[str, Any]
    axes: dict[str, tuple[Any, ...]]
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    no_dp: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        finite = [e for e in self.epsilons if math.isfinite(e)]
        if not finite or any(e <= 0 for e in finite):
            raise ConfigError(
                f"sweep '{self.name}': epsilons must hold at least one positive finite value, got "
                f"{self.epsilons}"
            )
        if not self.seeds:
            raise ConfigError(f"sweep '{self.name}': seeds must not be empty")
        for key, values in self.axes.items():
            if not values:
                raise ConfigError(f"sweep '{self.name}': axis '{key}' has no values")
        recipe_keys = {key for recipe in self.recipes.values() for key in recipe}
        clashes = sorted(
            {"epsilon", "seed", "out", "resume"}
            & (set(self.run_config) | set(self.axes) | recipe_keys | set(self.no_dp))
        )
        if clashes:
            raise ConfigError(
                f"sweep '{self.name}': {clashes} are set by the sweep itself; remove them"
            )
        if RECIPE_AXIS in self.axes:
            raise ConfigError(
                f"sweep '{self.name}': '{RECIPE_AXIS}' is the axis of [recipes]; name no axis so"
            )
        overlap = sorted(recipe_keys & set(self.axes))
        if overlap:
            raise ConfigError(
                f"sweep '{self.name}': {overlap} are set both by [axes] and by [recipes]; keep one"
            )
        check_keys({**self.run_config, **self.axes}, source=f"sweep '{self.name}'")
        for recipe, overrides in self.recipes.items():
            check_keys(overrides, source=f"sweep '{self.name}' recipe '{recipe}'")
        check_keys(self.no_dp, source=f"sweep '{self.name}' [no-dp]")

    @property
    def axis_names(self) -> list[str]:
        """The columns that tell cells apart besides method, epsilon and seed."""
        return sorted(self.axes) + ([RECIPE_AXIS] if self.recipes else [])

    @property
    def privacy_axis(self) -> tuple[float, ...]:
        """The epsilons to run, always with the non-private reference (inf) last."""
        return tuple(sorted({e for e in self.epsilons if math.isfinite(e)})) + (math.inf,)


def parse_seed(value: Any) -> int:
    """Seeds in TOML or on the command line: whole numbers."""
    try:
        return int(str(value))
    except ValueError:
        raise ConfigError(f"seed {value!r} is not a whole number") from None


def read_sweep(name_or_path: str) -> SweepConfig:
    path = named_toml(name_or_path, SWEEP_DIR, "sweep")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {unknown}; a sweep file has {sorted(SWEEP_KEYS)}"
        )
    axes = raw.get("axes", {})
    if not all(isinstance(v, list) for v in axes.values()):
        raise ConfigError(f"{path}: every entry of [axes] must be a list of values")
    recipes = raw.get("recipes", {})
    if not all(isinstance(v, dict) for v in recipes.values()):
        raise ConfigError(
            f"{path}: every entry of [recipes] must be a table of run-config keys "
            "([recipes.<name>])"
        )
    return SweepConfig(
        name=str(raw.get("name", path.stem)),
        scenario=str(raw.get("scenario", "default")),
        epsilons=tuple(
            read_epsilon(e, f"{path} epsilons") for e in raw.get("epsilons", [1.0, 3.0, 8.0, NO_DP])
        ),
        seeds=tuple(parse_seed(s) for s in raw.get("seeds", [0, 1, 2])),
        run_config=dict(raw.get("run-config", {})),
        axes={key: tuple(values) for key, values in axes.items()},
        recipes={name: dict(values) for name, values in recipes.items()},
        no_dp=dict(raw.get("no-dp", {})),
    )


@dataclass(frozen=True)
class Cell:
    """One run of the grid: a method at one epsilon, one seed and one point on the optional axes."""

    method: str
    epsilon: float
    seed: int
    axes: tuple[tuple[str, Any], ...]

    @property
    def id(self) -> str:
        parts = [self.method, f"eps-{show_epsilon(self.epsilon)}"]
        parts += [f"{key}-{value}" for key, value in self.axes]
        parts.append(f"seed-{self.seed}")
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "_".join(parts))

    def overrides(self, sweep: SweepConfig) -> dict[str, Any]:
        axes = dict(self.axes)
        recipe = sweep.recipes.get(axes.pop(RECIPE_AXIS, None), {})
        private = math.isfinite(self.epsilon) or self.method not in TRAINED_METHODS
        no_dp = {} if private else sweep.no_dp
        return {
            **sweep.run_config,
            **recipe,
            **axes,
            **no_dp,
            "seed": self.seed,
            "epsilon": self.epsilon,
        }


def plan_cells(sweep: SweepConfig) -> list[Cell]:
    """Every run, seeds innermost-last so a partial sweep already covers every setting once."""
    grid = {**sweep.axes, **({RECIPE_AXIS: tuple(sweep.recipes)} if sweep.recipes else {})}
    keys = sorted(grid)
    cells = []
    for seed in sweep.seeds:
        for values in itertools.product(*(grid[k] for k in keys)):
            axes = tuple(zip(keys, values, strict=True))
            cells.append(Cell("pooled", math.inf, seed, axes))
            cells.append(Cell("majority", math.inf, seed, axes))
            cells.append(Cell("zero-shot", math.inf, seed, axes))
            for method in ("local", "federated"):
                cells += [Cell(method, epsilon, seed, axes) for epsilon in sweep.privacy_axis]
    return cells


def cell_settings(cell: Cell, sweep: SweepConfig, runs: Path) -> RunSettings:
    """The settings a cell runs with, read once; a federated cell's run goes to `runs/<cell id>`."""
    overrides = cell.overrides(sweep)
    if cell.method == "federated":
        overrides["out"] = str(runs / cell.id)
    from medtune.federation.overrides import run_settings  # Flower's merge, loaded when used

    return run_settings(sweep.scenario, overrides)


def read_cells(sweep: SweepConfig, cells: list[Cell], runs: Path) -> dict[str, RunSettings]:
    """Every cell's settings, read and checked as its runner would before starting, before the
    first cell runs: {cell id: settings}.

    An axis value out of range (a prompt layer past the backbone, a prompt too long for its
    positions, too few records per hospital) is refused at once, naming its cell, never after the
    cells before it have run.
    """
    from medtune.federation.simulation import check_machine

    read = {}
    for cell in cells:
        try:
            read[cell.id] = cell_settings(cell, sweep, runs)
            check_machine(read[cell.id])
        except MedTuneError as error:
            raise ConfigError(
                f"sweep '{sweep.name}', cell {cell.id}: {error} (checked before running any cell)"
            ) from None
    return read


def _finished_run(out: Path, settings: RunSettings) -> bool:
    """Whether `out` holds a simulation of exactly these settings that ran every round.

    A sweep interrupted between a run's end and its cell file, or a cell file deleted to be scored
    again, then costs a re-scoring instead of a new simulation. Anything else is simulated anew.
    """
    from medtune.checkpoint import find_checkpoint
    from medtune.experiments.baselines import load_run

    rounds = settings.federation.rounds
    try:
        recorded, results = load_run(out)
        last_checkpoint = find_checkpoint(out).name
    except MedTuneError:
        return False
    same = replace(recorded, run_config={}) == replace(settings, run_config={})
    done = [r.round for r in results.rounds]
    return same and bool(done) and done[-1] == rounds and last_checkpoint == f"round_{rounds:03d}"


def _federated(settings: RunSettings) -> dict[str, Any]:
    from medtune.experiments.baselines import score_global_model
    from medtune.experiments.canary_audit import audited_epsilon, check_audit_settings, score_audit
    from medtune.federation.results import RunResults
    from medtune.federation.simulation import simulate
    from medtune.own_evaluations import simulated_scores

    out = settings.out
    if settings.audit.canaries:  # an audited sweep: each federated cell is an audit run
        check_audit_settings(settings)
    started = time.monotonic()
    reused = _finished_run(out, settings)
    if not reused:
        shutil.rmtree(out, ignore_errors=True)  # an interrupted cell starts over, ledgers included
        simulate(settings)
    results = RunResults.load(out, up_to_round=sys.maxsize)
    # A re-scored run did not run now: its cost is the time its rounds took (without the engine's
    # start).
    wall = sum(r.wall_seconds for r in results.rounds) if reused else time.monotonic() - started
    rounds = [r for r in results.rounds if r.accuracy is not None]
    if not rounds:
        raise ConfigError(
            f"federated run {out.name} finished no evaluated round; see {out}/results.json"
        )
    last = rounds[-1]
    hospital_rounds = [h for r in results.rounds for h in r.hospitals]
    accuracies = [h.accuracy for h in last.hospitals if h.accuracy is not None]
    # the coordinator never saw a hospital's own score: the simulated sites' own records
    if last.secure:
        own = simulated_scores(out, settings.source.hospitals)
        accuracies = [
            scores[last.round].accuracy for scores in own.values() if last.round in scores
        ]
    epsilons = results.epsilon_per_hospital()
    communicated = sum(h.bytes_up + h.bytes_down for h in hospital_rounds)
    _, own_mix = score_global_model(out)
    return {
        "accuracy": last.accuracy,
        "macro_f1": last.macro_f1,
        "worst_hospital_accuracy": min(accuracies),
        "mean_hospital_accuracy": sum(accuracies) / len(accuracies),
        # one global model: its own-test score is everyone's
        "accuracy_on_all_hospitals": last.accuracy,
        "own_mix_accuracy": own_mix.pooled.accuracy,
        "own_mix_macro_f1": own_mix.pooled.macro_f1,
        "own_mix_mean_hospital_accuracy": own_mix.mean_hospital_accuracy,
        "epsilon_spent": max(epsilons.values()) if epsilons else math.inf,
        "epsilon_per_hospital": epsilons,
        "rounds": len(results.rounds),
        "bytes_total": communicated,
        "bytes_per_hospital_round": communicated / max(1, len(hospital_rounds)),
        "wall_seconds": wall,
        **(
            {"epsilon_audited": audited_epsilon(score_audit(out))}
            if settings.audit.canaries
            else {}
        ),
    }


def _baseline(cell: Cell, settings: RunSettings) -> dict[str, Any]:
    from medtune.experiments.baselines import local_only, majority_label, pooled, zero_shot

    started = time.monotonic()
    if cell.method == "local":
        result = local_only(settings, cell.epsilon)
    elif cell.method == "pooled":
        result = pooled(settings)
    elif cell.method == "zero-shot":
        result = zero_shot(settings)
    else:
        result = majority_label(settings)
    row = result.to_dict()
    return {
        "accuracy": row["accuracy"],
        "macro_f1": row["macro_f1"],
        "worst_hospital_accuracy": row["worst_hospital_accuracy"],
        "mean_hospital_accuracy": row["mean_hospital_accuracy"],
        "accuracy_on_all_hospitals": row["accuracy_on_all_hospitals"],
        "epsilon_spent": max(result.epsilon_spent.values()),
        "epsilon_per_hospital": result.epsilon_spent,
        "rounds": 0,
        "bytes_total": 0,
        "bytes_per_hospital_round": 0,
        "wall_seconds": time.monotonic() - started,
    }


def run_cell(cell: Cell, settings: RunSettings, out: Path) -> dict[str, Any]:
    """Run one cell and write `cells/<id>.json` atomically: a finished cell is never run twice."""
    metrics = _federated(settings) if cell.method == "federated" else _baseline(cell, settings)
    row = {
        "cell": cell.id,
        "method": cell.method,
        "epsilon": cell.epsilon,
        "seed": cell.seed,
        **dict(cell.axes),
        **metrics,
    }
    atomic_write_json(out / "cells" / f"{cell.id}.json", row)
    return row


def check_same_grid(sweep: SweepConfig, out: Path) -> None:
    """Refuse to resume into cells run with another scenario, run config or axes.

    Cell ids name only method, epsilon, seed and axis values, so without this check a sweep edited
    between runs would silently mix old and new cells in one table. More epsilons or seeds are fine.
    """
    identity = {
        "scenario": sweep.scenario,
        "run-config": sweep.run_config,
        "axes": {k: list(v) for k, v in sweep.axes.items()},
    }
    if sweep.recipes:
        identity["recipes"] = sweep.recipes
    if sweep.no_dp:
        identity["no-dp"] = sweep.no_dp
    path = out / GRID_FILE
    if not path.is_file():
        atomic_write_json(path, identity)
        return
    recorded = read_json(path)
    # compared as written: an inf in the sweep file is "inf" there
    if recorded != json_ready(identity):
        raise ConfigError(
            f"{out} holds cells of another sweep grid ({path}: {recorded}); this sweep is "
            f"{identity}. Give another --out, or delete that directory to start over"
        )


def run_sweep(sweep: SweepConfig, out: Path, progress: bool = True) -> list[dict[str, Any]]:
    """Run every unfinished cell of the grid, then write the summary files."""
    from tqdm.auto import tqdm

    from medtune.experiments.sweep_report import write_report

    # Every cell reads the same hospitals: one feature cache for the whole sweep (keyed by content,
    # so cells of other settings never share an entry).
    shared = replace(
        sweep, run_config={"cache-dir": str((out / "feature-cache").resolve()), **sweep.run_config}
    )
    cells = plan_cells(shared)
    settings = read_cells(shared, cells, (out / "runs").resolve())
    # the grid as its file gives it: the cache folder is this directory's own
    check_same_grid(sweep, out)
    rows = []
    with tqdm(
        total=len(cells), desc=f"sweep {sweep.name}", unit="run", disable=not progress
    ) as bar:
        for cell in cells:
            done = out / "cells" / f"{cell.id}.json"
            bar.set_postfix_str(cell.id)
            rows.append(
                read_json(done) if done.is_file() else run_cell(cell, settings[cell.id], out)
            )
            bar.update(1)
    write_report(shared, rows, out)
    return rows
