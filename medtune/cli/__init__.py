"""`medtune` command line: one module per group of commands, each adding its parsers and handlers
(`set_defaults(handler=..., command_name=...)`). Flags of `train` and `difficulty` are derived from
the config dataclasses (medtune/cli/flags.py); flags left unset keep their defaults from
pyproject.toml.

This is the top floor: it may import the federation and the experiments; the core never imports it.
Every MedTuneError is printed as one line, `error: ...`, with exit status 2: no tracebacks.
"""

from __future__ import annotations

import argparse
import sys

from medtune.cli.audit_command import add_audit_command
from medtune.cli.benchmark_commands import add_benchmark_commands
from medtune.cli.data_commands import add_data_commands
from medtune.cli.simulate_command import add_simulate_command
from medtune.cli.site_commands import add_site_commands
from medtune.cli.train_commands import add_train_commands
from medtune.errors import MedTuneError
from medtune.logs import quiet_libraries, show_medtune_lines
from medtune.stopping import EXIT_STATUS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtune", description="Federated DP prompt tuning on clinical text"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (
        add_data_commands,
        add_site_commands,
        add_train_commands,
        add_simulate_command,
        add_audit_command,
        add_benchmark_commands,
    ):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # reads the defaults in pyproject.toml
    except MedTuneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    quiet_libraries()
    # a site's runner logs with timestamps of its own (client/site_runner.py)
    if args.command_name != "site run":
        show_medtune_lines()
    try:
        # None, or an exit status of its own (`site run`, `site review`)
        status = args.handler(args)
    # Ctrl-C in any other command (a simulation stops itself: medtune/stopping.py)
    except KeyboardInterrupt:
        print(
            f"interrupted: stopped by SIGINT before `medtune {args.command_name}` finished; "
            "checkpoints, ledgers and results are written whole (atomic rename), but a data file "
            "or plot it was writing may be cut short",
            file=sys.stderr,
        )
        return EXIT_STATUS
    except MedTuneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # a folder it cannot write (read-only --out), a full disk: one line, never a traceback
    except OSError as error:
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    return status or 0
