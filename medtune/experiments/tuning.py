"""`medtune benchmark tune`: choose a recipe on validation data, never on the test splits benchmarks
report.

Each simulated hospital's training split (exactly the one every run and sweep uses) is cut once
more by seed: 80% to fit, 20% to validate. A candidate recipe (any run-config keys: prompt layer,
learning rate, local epochs, prompt length, head init, ...) is trained with DP at the sweep's
target on every hospital's fit part together, for the run's rounds x local epochs passes, and
scored on every hospital's validation part. Training throughput (records per second of DP
training) and the one-off cost of the feature cache are measured in the same run, so the table
shows what each choice costs as well as what it earns. The test splits are never read.
"""

from __future__ import annotations

import itertools
import time
import tomllib
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medtune.backbone import load_backbone, resolve_device
from medtune.config import federation_passes
from medtune.data import Record, train_test_split
from medtune.epsilon import show_epsilon
from medtune.errors import ConfigError
from medtune.evaluation import evaluate
from medtune.experiments.sweep import SweepConfig
from medtune.features import record_inputs
from medtune.files import atomic_write_json
from medtune.run_config import RunSettings, check_keys

VALIDATION_FRACTION = 0.2


def parse_grid(lines: list[str]) -> dict[str, tuple[Any, ...]]:
    """`key=[v1, v2]` lines (TOML values) into grid axes; a bare value is an axis of one."""
    try:
        grid = tomllib.loads("\n".join(lines))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--grid {lines}: not TOML 'key=[values]' lines ({error})") from None
    check_keys(grid, source="--grid")
    return {
        key: tuple(value) if isinstance(value, list) else (value,) for key, value in grid.items()
    }


def validation_split(settings: RunSettings) -> tuple[list[Record], list[Record]]:
    """Every hospital's fit and validation parts, carved from its training split only."""
    from medtune.experiments.baselines import splits

    fit, validation = [], []
    for split in splits(settings):
        hospital_fit, hospital_validation = train_test_split(
            split.train, VALIDATION_FRACTION, settings.seed + 1
        )
        fit += hospital_fit
        validation += hospital_validation
    return fit, validation


def score_candidate(settings: RunSettings, cache: Path) -> dict[str, Any]:
    """Train one recipe on the fit parts and score it on the validation parts."""
    from medtune.experiments.baselines import train_alone
    from medtune.label_prior import initial_model

    backbone = load_backbone(
        settings.model.backbone, settings.model.num_layers, settings.train.device
    )
    fit, validation = validation_split(settings)
    started = time.perf_counter()
    fit_set = record_inputs(backbone, settings.model, fit, cache)
    validation_set = record_inputs(backbone, settings.model, validation, cache)
    inputs_seconds = time.perf_counter() - started
    model = initial_model(backbone, settings.model, settings.data, seed=settings.seed)
    pad = backbone.tokenizer.pad_token_id
    started = time.perf_counter()
    result = train_alone(settings, model, fit_set, pad, seed=settings.seed)
    train_seconds = time.perf_counter() - started
    passes = federation_passes(settings.federation.rounds, settings.train.local_epochs)
    scored = evaluate(
        model, validation_set, settings.data.labels, pad, resolve_device(settings.train.device)
    )
    return {
        "validation_accuracy": scored.accuracy,
        "validation_macro_f1": scored.macro_f1,
        "epsilon_spent": result.epsilon,
        "train_records_per_s": len(fit_set) * passes / train_seconds,
        "train_seconds": train_seconds,
        "inputs_seconds": inputs_seconds,
        "fit_records": len(fit_set),
        "validation_records": len(validation_set),
    }


def run_tuning(
    sweep: SweepConfig, grid: dict[str, tuple[Any, ...]], epsilon: float, out: Path
) -> list[dict[str, Any]]:
    """Score every combination of the grid on the sweep's hospitals (its first seed) at
    `epsilon`."""
    from medtune.federation.overrides import run_settings  # Flower's merge, loaded when used

    keys = sorted(grid)
    rows = []
    cache = (out / "feature-cache").resolve()
    for values in itertools.product(*(grid[k] for k in keys)):
        candidate = dict(zip(keys, values, strict=True))
        overrides = {**sweep.run_config, **candidate, "seed": sweep.seeds[0], "epsilon": epsilon}
        settings = run_settings(sweep.scenario, overrides)
        rows.append({**candidate, **score_candidate(settings, cache)})
        atomic_write_json(
            out / "tuning.json", {"sweep": sweep.name, "epsilon": epsilon, "rows": rows}
        )
    _print(sweep, keys, rows, epsilon)
    return rows


def _print(sweep: SweepConfig, keys: list[str], rows: list[dict[str, Any]], epsilon: float) -> None:
    table = Table(
        title=f"{sweep.name}: validation scores at epsilon={show_epsilon(epsilon)} "
        "(test splits untouched)"
    )
    columns = [*keys, "val. accuracy", "val. macro-F1", "train records/s", "inputs s", "train s"]
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            *(str(row[k]) for k in keys),
            f"{row['validation_accuracy']:.3f}",
            f"{row['validation_macro_f1']:.3f}",
            f"{row['train_records_per_s']:.0f}",
            f"{row['inputs_seconds']:.1f}",
            f"{row['train_seconds']:.1f}",
        )
    Console().print(table)
