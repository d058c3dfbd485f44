"""`medtune benchmark perf|baselines|sweep|tune|difficulty`: scripts that print figures."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medtune.cli.flags import add_config_flags, add_training_flags, epsilon_flag, given_flags
from medtune.config import (
    ModelConfig,
    TrainConfig,
    check_fits_backbone,
    config_from_dict,
)
from medtune.defaults import run_defaults
from medtune.epsilon import read_epsilon
from medtune.errors import ConfigError
from medtune.files import atomic_write_json, check_writable
from medtune.synth_config import SynthConfig


def add_benchmark_commands(commands: Any) -> None:
    bench = commands.add_parser("benchmark", help="benchmarks").add_subparsers(
        dest="bench_command", required=True
    )
    perf = bench.add_parser("perf", help="training and inference throughput, with and without DP")
    perf.add_argument("--layers", default="6", help="comma-separated backbone depths")
    perf.add_argument(
        "--max-lengths",
        default=str(run_defaults()["max-length"]),
        help="comma-separated token counts",
    )
    perf.add_argument(
        "--prompt-layers", default="0,1,2,3,4,5,6", help="comma-separated prompt layers (0 = input)"
    )
    perf.add_argument("--batch-size", type=int, default=16)
    perf.add_argument("--steps", type=int, default=8, help="timed training steps per setting")
    perf.add_argument("--out", type=Path, help="also write the table as JSON here")
    perf.add_argument(
        "--backbone", help="a local Hugging Face encoder directory (default: the embedded MiniLM)"
    )
    perf.add_argument(
        "--records",
        help="instead of throughput: run `medtune train --epochs 1` on a synthetic site of this "
        "many records (comma-separated: one run each) and print its peak anonymous memory, wall "
        "time and feature-cache size on disk",
    )
    perf.add_argument(
        "--work",
        type=Path,
        default=Path("runs/benchmark/site-memory"),
        help="with --records: where the records, the run and (while it runs) its cache go",
    )
    perf.add_argument(
        "train_args",
        nargs="*",
        help="with --records, after --: flags for medtune train, e.g. -- --max-length 32",
    )
    baselines = bench.add_parser(
        "baselines",
        help="local-only, pooled and majority-label references for a scenario, or for a run "
        "(--run)",
    )
    baselines.add_argument(
        "--scenario", help="name in simulations/scenarios/ or a TOML path (default: default)"
    )
    baselines.add_argument(
        "--run-config", default="", help="overrides, as for flwr: 'key=value key2=value2'"
    )
    baselines.add_argument("--out", type=Path, help="also write the figures as JSON here")
    baselines.add_argument(
        "--run",
        type=Path,
        help="a `medtune simulate` out directory: take its settings, and add its final global "
        "model as it is and with each hospital's own label mix",
    )
    sweep = bench.add_parser(
        "sweep",
        help="privacy/accuracy grid: federated and local at each epsilon, without DP, and pooled",
        description="Runs every cell of a sweep file (simulations/benchmarks/<name>.toml) over its "
        "seeds and writes results.csv, results.json, report.md and accuracy_vs_epsilon.png. "
        "Finished runs are kept in OUT/cells/, so an interrupted sweep resumes where it stopped.",
    )
    sweep.add_argument(
        "--sweep", default="synthetic", help="name in simulations/benchmarks/ or a TOML path"
    )
    sweep.add_argument(
        "--epsilons", help="comma-separated epsilons, e.g. 1,3,8,inf (default: the sweep file's)"
    )
    sweep.add_argument("--seeds", help="comma-separated seeds (default: the sweep file's)")
    sweep.add_argument(
        "--run-config", default="", help="more overrides for every run: 'key=value key2=value2'"
    )
    sweep.add_argument(
        "--out", type=Path, help="output directory (default: runs/benchmark/<sweep name>)"
    )
    sweep.add_argument(
        "--audit-canaries",
        type=int,
        help="make each federated cell a white-box epsilon audit with this many canaries at "
        "hospital_1 (medtune audit) and add the column 'epsilon audited (lower bound)'; the "
        "canaries move that hospital's updates, so these cells' accuracy is an audited run's",
    )
    tune = bench.add_parser(
        "tune",
        help="score recipes (prompt layer, learning rate, ...) on validation parts of the "
        "hospitals' training splits",
        description="Cuts every hospital's training split into fit and validation parts (the test "
        "splits are never read), trains each combination of --grid with DP on the fit parts and "
        "prints validation accuracy, macro-F1 and DP training records/s. Writes OUT/tuning.json.",
    )
    tune.add_argument(
        "--sweep", default="synthetic", help="the hospitals and settings of this sweep file"
    )
    tune.add_argument(
        "--grid",
        action="append",
        required=True,
        help="run-config key and TOML list of values, e.g. 'prompt-layer=[0,3,5]' (repeatable: the "
        "grid is the product)",
    )
    tune.add_argument(
        "--epsilon",
        default=str(run_defaults()["epsilon"]),
        help="each candidate's privacy target (inf: no DP)",
    )
    tune.add_argument(
        "--run-config",
        default="",
        help="more overrides for every candidate: 'key=value key2=value2'",
    )
    tune.add_argument(
        "--out", type=Path, help="output directory (default: runs/tuning/<sweep name>)"
    )
    synth_defaults = SynthConfig()
    difficulty = bench.add_parser(
        "difficulty", help="synthetic data: pooled vs smallest hospital alone"
    )
    difficulty.add_argument(
        "--hospitals", type=int, help=f"synthetic hospitals (default: {synth_defaults.hospitals})"
    )
    add_config_flags(difficulty.add_argument_group("model"), ModelConfig)
    add_training_flags(difficulty)  # each model trains alone: --epochs passes in total
    perf.set_defaults(handler=_cmd_perf, command_name="benchmark perf")
    baselines.set_defaults(handler=_cmd_baselines, command_name="benchmark baselines")
    sweep.set_defaults(handler=_cmd_sweep, command_name="benchmark sweep")
    tune.set_defaults(handler=_cmd_tune, command_name="benchmark tune")
    difficulty.set_defaults(handler=_cmd_difficulty, command_name="benchmark difficulty")


def _cmd_perf(args: argparse.Namespace) -> None:
    from medtune.experiments.perf import run_perf

    if args.records is not None:
        from medtune.experiments.site_memory import run_site_memory

        run_site_memory(_record_counts(args.records), args.work, args.train_args, args.out)
        return
    if args.train_args:
        raise ConfigError(
            f"benchmark perf: flags after -- ({' '.join(args.train_args)}) are for medtune train; "
            "add --records N"
        )
    run_perf(
        layers=[int(x) for x in args.layers.split(",")],
        max_lengths=[int(x) for x in args.max_lengths.split(",")],
        prompt_layers=[int(x) for x in args.prompt_layers.split(",")],
        batch_size=args.batch_size,
        steps=args.steps,
        out=args.out,
        backbone_path=args.backbone,
    )


def _record_counts(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        message = (
            f"--records: expected whole numbers separated by commas (e.g. 2000,8000), got '{text}'"
        )
        raise ConfigError(message) from None


def _cmd_baselines(args: argparse.Namespace) -> None:
    from medtune.experiments.baselines import (
        BaselineResult,
        load_run,
        local_only,
        majority_label,
        pooled,
        score_global_model,
        zero_shot,
    )
    from medtune.federation.overrides import parse_overrides, run_settings

    figures: list[BaselineResult] = []
    if args.run is not None and (args.scenario or args.run_config):
        raise ConfigError(
            "--run takes the run's own settings (from its results.json); drop --scenario and "
            "--run-config"
        )
    if args.out:
        check_writable(args.out, folder=False)
    if args.run is not None:
        settings, _ = load_run(args.run)
        figures += score_global_model(args.run)
    else:
        settings = run_settings(args.scenario or "default", parse_overrides(args.run_config))
    figures += [
        local_only(settings),
        pooled(settings),
        majority_label(settings),
        zero_shot(settings),
    ]
    for result in figures:
        print(
            f"{result.name:34s} own test splits: accuracy {result.pooled.accuracy:.3f}  macro-F1 "
            f"{result.pooled.macro_f1:.3f}  mean hospital {result.mean_hospital_accuracy:.3f} | "
            f"every hospital's test split: accuracy {result.everyone.accuracy:.3f}  macro-F1 "
            f"{result.everyone.macro_f1:.3f}"
        )
    if args.out:
        atomic_write_json(
            args.out, {"config": settings.run_config, "baselines": [r.to_dict() for r in figures]}
        )


def _cmd_sweep(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from medtune.experiments.canary_audit import audit_overrides
    from medtune.experiments.sweep import parse_seed, read_sweep, run_sweep
    from medtune.federation.overrides import parse_overrides

    sweep = read_sweep(args.sweep)
    changes: dict[str, Any] = {
        "run_config": {**sweep.run_config, **parse_overrides(args.run_config)}
    }
    if args.audit_canaries is not None:
        changes["run_config"].update(
            audit_overrides(args.audit_canaries, "hospital_1", "white-box")
        )
    if args.epsilons:
        changes["epsilons"] = tuple(read_epsilon(e, "--epsilons") for e in args.epsilons.split(","))
    if args.seeds:
        changes["seeds"] = tuple(parse_seed(s) for s in args.seeds.split(","))
    sweep = replace(sweep, **changes)
    out = args.out or Path("runs/benchmark") / sweep.name
    check_writable(out, folder=True)
    run_sweep(sweep, out)
    print(f"wrote {out}/results.csv, results.json, report.md and accuracy_vs_epsilon.png")


def _cmd_tune(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from medtune.experiments.sweep import read_sweep
    from medtune.experiments.tuning import parse_grid, run_tuning
    from medtune.federation.overrides import parse_overrides

    sweep = read_sweep(args.sweep)
    sweep = replace(sweep, run_config={**sweep.run_config, **parse_overrides(args.run_config)})
    out = args.out or Path("runs/tuning") / sweep.name
    check_writable(out, folder=True)
    run_tuning(sweep, parse_grid(args.grid), epsilon_flag(args.epsilon), out)
    print(f"wrote {out}/tuning.json")


def _cmd_difficulty(args: argparse.Namespace) -> None:
    from medtune.experiments.difficulty import run_difficulty

    train = config_from_dict(TrainConfig, given_flags(args, TrainConfig))
    model = config_from_dict(ModelConfig, given_flags(args, ModelConfig))
    check_fits_backbone(model)
    hospitals = {} if args.hospitals is None else {"hospitals": args.hospitals}
    run_difficulty(SynthConfig(**hospitals, seed=train.seed), model, train, args.passes)
