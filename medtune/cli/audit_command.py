"""`medtune audit`: the one-run epsilon audit (--canaries, --score) and the membership attack
(--run)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medtune.config import AUDIT_MODES
from medtune.errors import ConfigError
from medtune.files import atomic_write_json, check_writable


def add_audit_command(commands: Any) -> None:
    audit = commands.add_parser(
        "audit",
        help="privacy audits: an epsilon lower bound from canaries (--canaries), or a "
        "membership-inference attack (--run)",
        description="--canaries M: simulate the federation (its --scenario and --run-config) with "
        "M canaries of each kind at one hospital and certify, at 95%% confidence, an epsilon the "
        "mechanism cannot be below, beside the ledger's epsilon (white box: gradient canaries "
        "scored by the updates the coordinator received; black box: input canaries scored by the "
        "final model's loss). --score OUT scores such a run again. --run RUN --hospital H: the "
        "loss-threshold membership attack (AUC, TPR at 1%% FPR) on a finished simulated run.",
    )
    audit.add_argument(
        "--canaries", type=int, help="M canaries of each kind: run an epsilon audit into --out"
    )
    audit.add_argument(
        "--scenario", default="default", help="with --canaries: the audited federation's scenario"
    )
    audit.add_argument(
        "--run-config",
        default="",
        help="with --canaries: its overrides, as for flwr: 'key=value ...'",
    )
    audit.add_argument(
        "--score", type=Path, help="score a finished `medtune audit --canaries` run again"
    )
    audit.add_argument(
        "--run",
        type=Path,
        help="membership attack: a `medtune simulate` out directory or checkpoint",
    )
    audit.add_argument(
        "--hospital", help="the audited hospital (default for --canaries: hospital_1)"
    )
    audit.add_argument(
        "--mode",
        choices=AUDIT_MODES,
        default="both",
        help="with --canaries: white-box (gradient canaries), black-box (input canaries: M at most "
        "the hospital's training records) or both in one run",
    )
    audit.add_argument(
        "--out", type=Path, help="--canaries: the run's out directory; --run: also write JSON here"
    )

    audit.set_defaults(handler=_cmd_audit, command_name="audit")


def _cmd_audit(args: argparse.Namespace) -> None:
    chosen = [
        flag
        for flag, value in (
            ("--canaries", args.canaries),
            ("--score", args.score),
            ("--run", args.run),
        )
        if value is not None
    ]
    if len(chosen) != 1:
        raise ConfigError(
            "medtune audit takes one of --canaries M, --score OUT or --run RUN; got "
            f"{chosen or 'none'}"
        )
    if args.run is not None:
        _membership_attack(args)
        return
    from medtune.experiments.canary_audit import audit_lines, run_audit, score_audit

    if args.score is not None:
        report = score_audit(args.score)
    else:
        from medtune.federation.overrides import parse_overrides

        if args.out is None:
            raise ConfigError(
                "medtune audit --canaries needs --out: the audit's run is kept there to be scored "
                "again"
            )
        check_writable(args.out, folder=True)
        overrides = {**parse_overrides(args.run_config), "out": str(args.out)}
        report = run_audit(
            args.scenario, overrides, args.canaries, args.hospital or "hospital_1", args.mode
        )
    print("\n".join(audit_lines(report)))


def _membership_attack(args: argparse.Namespace) -> None:
    from medtune.experiments.audit import audit_run

    if args.hospital is None:
        raise ConfigError(
            "medtune audit --run needs --hospital: the hospital whose records are attacked"
        )
    if args.out:
        check_writable(args.out, folder=False)
    result = audit_run(args.run, args.hospital)
    print(
        f"{args.hospital}: {result.members} members, {result.non_members} non-members; mean loss "
        f"{result.member_loss:.3f} vs {result.non_member_loss:.3f}\n"
        f"loss-threshold attack AUC {result.auc:.3f} (0.5 = chance), TPR at 1% FPR "
        f"{result.tpr_at_1pct_fpr:.3f}"
    )
    if args.out:
        atomic_write_json(args.out, result.to_dict())
