"""`medtune simulate`: a federation of simulated hospitals, the same run as `flwr run .`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medtune.files import check_writable


def add_simulate_command(commands: Any) -> None:
    simulate = commands.add_parser(
        "simulate",
        help="run a federation of simulated hospitals (Flower Simulation Engine)",
        description="Same run as `flwr run .`: defaults from pyproject.toml's "
        "[tool.flwr.app.config], then the scenario file, then these flags and --run-config.",
    )
    simulate.add_argument(
        "--scenario", default="default", help="name in simulations/scenarios/ or a TOML path"
    )
    simulate.add_argument("--rounds", type=int)
    simulate.add_argument("--epsilon", help="each hospital's target epsilon (inf: no DP)")
    simulate.add_argument("--seed", type=int)
    simulate.add_argument(
        "--out", type=Path, help="output directory (results.json, checkpoints/, sites/)"
    )
    simulate.add_argument(
        "--resume", type=Path, help="continue from a checkpoint dir, or the latest under OUT"
    )
    simulate.add_argument("--until-round", type=int, help="stop after this round (resume later)")
    simulate.add_argument(
        "--run-config", default="", help="more overrides, as for flwr: 'key=value key2=value2'"
    )
    simulate.add_argument(
        "--cpus-per-hospital", type=float, default=1.0, help="Ray CPUs per simulated hospital"
    )

    simulate.set_defaults(handler=_cmd_simulate, command_name="simulate")


def _cmd_simulate(args: argparse.Namespace) -> None:
    from medtune.federation.overrides import parse_overrides, run_settings
    from medtune.federation.simulation import simulate
    from medtune.own_evaluations import print_own_scores

    overrides = parse_overrides(args.run_config)
    # The flags are run-config keys: their values are read with the rest (epsilon's text too).
    flags = {
        "rounds": args.rounds,
        "epsilon": args.epsilon,
        "seed": args.seed,
        "until-round": args.until_round,
    }
    overrides.update({key: value for key, value in flags.items() if value is not None})
    if args.out is not None:
        check_writable(args.out, folder=True)
        overrides["out"] = str(args.out)
    if args.resume is not None:
        overrides["resume"] = str(args.resume)
        overrides.setdefault(
            "out",
            str(args.resume if (args.resume / "checkpoints").is_dir() else args.resume.parents[1]),
        )
    settings = run_settings(args.scenario, overrides)
    results = simulate(settings, cpus_per_hospital=args.cpus_per_hospital)
    print_own_scores(results.parent, settings.source.hospitals)
    print(f"wrote {results} and {results.parent / 'checkpoints'}")
