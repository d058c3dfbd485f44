"""`medtune data synth`: write synthetic hospitals as CSV files."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medtune.files import check_writable
from medtune.synth_config import SynthConfig


def add_data_commands(commands: Any) -> None:
    data = commands.add_parser("data", help="data utilities").add_subparsers(
        dest="data_command", required=True
    )
    synth = data.add_parser("synth", help="write synthetic hospitals as CSV files")
    synth_defaults = SynthConfig()
    synth.add_argument(
        "--hospitals", type=int, help=f"number of hospitals (default: {synth_defaults.hospitals})"
    )
    synth.add_argument(
        "--records",
        type=int,
        help=f"mean records per hospital (default: {synth_defaults.mean_records})",
    )
    synth.add_argument(
        "--alpha",
        type=float,
        help=f"Dirichlet label-skew concentration (default: {synth_defaults.dirichlet_alpha})",
    )
    synth.add_argument(
        "--label-noise",
        type=float,
        help=f"share of records with a wrong label (default: {synth_defaults.label_noise})",
    )
    synth.add_argument("--seed", type=int, help=f"(default: {synth_defaults.seed})")
    synth.add_argument("--out", type=Path, default=Path("data/synthetic"))

    synth.set_defaults(handler=_cmd_synth, command_name="data synth")


def _cmd_synth(args: argparse.Namespace) -> None:
    from medtune.synth import LABELS, write_hospitals

    flags = {
        "hospitals": args.hospitals,
        "mean_records": args.records,
        "dirichlet_alpha": args.alpha,
        "label_noise": args.label_noise,
        "seed": args.seed,
    }
    config = SynthConfig(**{name: value for name, value in flags.items() if value is not None})
    check_writable(args.out, folder=True)
    for path in write_hospitals(config, args.out):
        print(path)
    print(f"labels: {','.join(LABELS)}")
