"""`medtune` command line. Flags of `train` and `difficulty` are derived from the config dataclasses;
flags left unset keep their defaults, which come from pyproject.toml (medtune/defaults.py).

Every MedTuneError is printed as one line, `error: ...`, with exit status 2: no tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

from medtune.config import (
    ACCOUNTANTS,
    AUDIT_MODES,
    HEAD_INITS,
    PROMPT_INITS,
    DataConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
    check_fits_backbone,
    config_from_dict,
    field_kinds,
    run_config_key,
)
from medtune.defaults import key_help, run_defaults
from medtune.epsilon import read_epsilon
from medtune.errors import ConfigError, MedTuneError
from medtune.files import atomic_write_json, check_writable
from medtune.logs import quiet_libraries, show_medtune_lines
from medtune.stopping import EXIT_STATUS
from medtune.synth_config import SynthConfig


# Flags are derived from the config dataclasses' fields: `prompt_length` becomes --prompt-length,
# with the default and the help of run-config key `prompt-length` in pyproject.toml.
FLAG_ALIASES = {"num_layers": ("--layers",), "learning_rate": ("--lr",)}  # shorter spellings kept for users
FLAG_CHOICES = {"prompt_init": PROMPT_INITS, "head_init": HEAD_INITS, "accountant": ACCOUNTANTS}
FLAG_HELP = {
    "epochs": "passes over the records (default: rounds x local-epochs of the run config, as in the default federation)",
    "epsilon": "target epsilon for the whole participation (inf: no DP; default: the run config's epsilon)",
}
NOT_FLAGS = {"labels", "label_descriptions"}  # lists, given as --labels a,b and --label-descriptions 'x|y'


def _add_config_flags(group: Any, config: type) -> None:
    """One flag per field of a config dataclass; unset flags keep the field's default (pyproject.toml)."""
    helps, defaults = key_help(), run_defaults()
    for name, kind in field_kinds(config).items():
        if name in NOT_FLAGS:
            continue
        key = run_config_key(name)
        group.add_argument(
            f"--{key}",
            *FLAG_ALIASES.get(name, ()),
            dest=name,
            # numbers are parsed here; epsilon's text ("inf") is read by PrivacyConfig
            type=kind if kind in (int, float) and name != "epsilon" else None,
            choices=FLAG_CHOICES.get(name),
            help=FLAG_HELP.get(name) or f"{helps.get(key, key)} (default: {defaults[key]!r})",
        )


def _given(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The config fields whose flags the user actually gave."""
    return {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(config)
        if field.name not in NOT_FLAGS and getattr(args, field.name, None) is not None
    }


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", type=Path, help="records file (.csv, .jsonl, .parquet); default: one synthetic hospital of 1,500 notes")
    group.add_argument("--labels", help="comma-separated federation label list (default: the synthetic labels)")
    group.add_argument("--label-descriptions", help=key_help().get("label-descriptions"))
    _add_config_flags(group, DataConfig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medtune", description="Federated DP prompt tuning on clinical text")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write synthetic hospitals as CSV files")
    synth_defaults = SynthConfig()
    synth.add_argument("--hospitals", type=int, help=f"number of hospitals (default: {synth_defaults.hospitals})")
    synth.add_argument("--records", type=int, help=f"mean records per hospital (default: {synth_defaults.mean_records})")
    synth.add_argument(
        "--alpha", type=float, help=f"Dirichlet label-skew concentration (default: {synth_defaults.dirichlet_alpha})"
    )
    synth.add_argument(
        "--label-noise", type=float, help=f"share of records with a wrong label (default: {synth_defaults.label_noise})"
    )
    synth.add_argument("--seed", type=int, help=f"(default: {synth_defaults.seed})")
    synth.add_argument("--out", type=Path, default=Path("data/synthetic"))

    certs = commands.add_parser("certs", help="deployment: TLS certificates and SuperNode keys").add_subparsers(
        dest="certs_command", required=True
    )
    server_certs = certs.add_parser("server", help="consortium CA (kept if present) and a SuperLink TLS certificate")
    server_certs.add_argument("--host", action="append", required=True, help="SuperLink DNS name or IP (repeatable)")
    server_certs.add_argument("--out", type=Path, default=Path("certificates"))
    server_certs.add_argument("--rotate", action="store_true", help="replace an existing SuperLink key and certificate")
    node_keys = certs.add_parser("node", help="a hospital's SuperNode authentication key pair (EC P-384, OpenSSH)")
    node_keys.add_argument("--hospital", required=True, help="the hospital's name; names the key files")
    node_keys.add_argument("--out", type=Path, default=Path("keys"))

    site = commands.add_parser("site", help="deployment: run a hospital's site from its site file").add_subparsers(
        dest="site_command", required=True
    )
    site_run = site.add_parser("run", help="start this hospital's SuperNode; it runs only the code the site approved")
    site_run.add_argument("site_file", type=Path, help="the site file (TOML; see docs/deployment.md)")
    site_check = site.add_parser("check", help="check a site file and print the SuperNode command it gives")
    site_check.add_argument("site_file", type=Path)
    review = site.add_parser("review", help="a FAB's hash and how its Python code differs from the installed MedTune")
    review.add_argument("fab", type=Path, help="a .fab file (`flwr build`, or one kept under refused-fabs/)")

    train = commands.add_parser("train", help="train one hospital alone, with DP, and evaluate it")
    _add_data_flags(train)
    _add_config_flags(train.add_argument_group("model"), ModelConfig)
    _add_config_flags(train.add_argument_group("privacy"), PrivacyConfig)
    _add_config_flags(train.add_argument_group("training"), TrainConfig)
    train.add_argument("--ledger", type=Path, help="privacy ledger file to continue (default: OUT/ledger.json)")
    train.add_argument("--out", type=Path, default=Path("runs/local"))

    simulate = commands.add_parser(
        "simulate",
        help="run a federation of simulated hospitals (Flower Simulation Engine)",
        description="Same run as `flwr run .`: defaults from pyproject.toml's [tool.flwr.app.config], "
        "then the scenario file, then these flags and --run-config.",
    )
    simulate.add_argument("--scenario", default="default", help="name in simulations/scenarios/ or a TOML path")
    simulate.add_argument("--rounds", type=int)
    simulate.add_argument("--epsilon", help="each hospital's target epsilon (inf: no DP)")
    simulate.add_argument("--seed", type=int)
    simulate.add_argument("--out", type=Path, help="output directory (results.json, checkpoints/, sites/)")
    simulate.add_argument("--resume", type=Path, help="continue from a checkpoint dir, or the latest under OUT")
    simulate.add_argument("--until-round", type=int, help="stop after this round (resume later)")
    simulate.add_argument("--run-config", default="", help="more overrides, as for flwr: 'key=value key2=value2'")
    simulate.add_argument("--cpus-per-hospital", type=float, default=1.0, help="Ray CPUs per simulated hospital")

    predict = commands.add_parser("predict", help="classify texts with a saved checkpoint")
    predict.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory (or a run's out dir)")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to classify (repeatable)")
    source.add_argument("--input", type=Path, help="records file (.csv, .jsonl, .parquet) with a text column")
    predict.add_argument("--text-column", default=run_defaults()["text-column"])
    predict.add_argument(
        "--label-mix", type=Path,
        help="this hospital's labelled records (.csv, .jsonl, .parquet): re-weight predictions to its label mix",
    )
    predict.add_argument("--label-column", help="label column of the --label-mix file (default: label)")
    predict.add_argument("--backbone", help="backbone directory, if not the one named in the checkpoint")

    audit = commands.add_parser(
        "audit",
        help="privacy audits: an epsilon lower bound from canaries (--canaries), or a membership-inference attack (--run)",
        description="--canaries M: simulate the federation (its --scenario and --run-config) with M canaries of each "
        "kind at one hospital and certify, at 95%% confidence, an epsilon the mechanism cannot be below, beside the "
        "ledger's epsilon (white box: gradient canaries scored by the updates the coordinator received; black box: "
        "input canaries scored by the final model's loss). --score OUT scores such a run again. --run RUN --hospital "
        "H: the loss-threshold membership attack (AUC, TPR at 1%% FPR) on a finished simulated run.",
    )
    audit.add_argument("--canaries", type=int, help="M canaries of each kind: run an epsilon audit into --out")
    audit.add_argument("--scenario", default="default", help="with --canaries: the audited federation's scenario")
    audit.add_argument("--run-config", default="", help="with --canaries: its overrides, as for flwr: 'key=value ...'")
    audit.add_argument("--score", type=Path, help="score a finished `medtune audit --canaries` run again")
    audit.add_argument("--run", type=Path, help="membership attack: a `medtune simulate` out directory or checkpoint")
    audit.add_argument("--hospital", help="the audited hospital (default for --canaries: hospital_1)")
    audit.add_argument("--mode", choices=AUDIT_MODES, default="both",
                       help="with --canaries: white-box (gradient canaries), black-box (input canaries: M at most the "
                       "hospital's training records) or both in one run")
    audit.add_argument("--out", type=Path, help="--canaries: the run's out directory; --run: also write JSON here")

    bench = commands.add_parser("benchmark", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    perf = bench.add_parser("perf", help="training and inference throughput, with and without DP")
    perf.add_argument("--layers", default="6", help="comma-separated backbone depths")
    perf.add_argument("--max-lengths", default=str(run_defaults()["max-length"]), help="comma-separated token counts")
    perf.add_argument("--prompt-layers", default="0,1,2,3,4,5,6", help="comma-separated prompt layers (0 = input)")
    perf.add_argument("--batch-size", type=int, default=16)
    perf.add_argument("--steps", type=int, default=8, help="timed training steps per setting")
    perf.add_argument("--out", type=Path, help="also write the table as JSON here")
    perf.add_argument("--backbone", help="a local Hugging Face encoder directory (default: the embedded MiniLM)")
    perf.add_argument(
        "--records",
        help="instead of throughput: run `medtune train --epochs 1` on a synthetic site of this many records (comma-"
        "separated: one run each) and print its peak anonymous memory, wall time and feature-cache size on disk",
    )
    perf.add_argument("--work", type=Path, default=Path("runs/benchmark/site-memory"),
                      help="with --records: where the records, the run and (while it runs) its cache go")
    perf.add_argument("train_args", nargs="*",
                      help="with --records, after --: flags for medtune train, e.g. -- --max-length 32")
    baselines = bench.add_parser(
        "baselines", help="local-only, pooled and majority-label references for a scenario, or for a run (--run)"
    )
    baselines.add_argument("--scenario", help="name in simulations/scenarios/ or a TOML path (default: default)")
    baselines.add_argument("--run-config", default="", help="overrides, as for flwr: 'key=value key2=value2'")
    baselines.add_argument("--out", type=Path, help="also write the figures as JSON here")
    baselines.add_argument(
        "--run", type=Path,
        help="a `medtune simulate` out directory: take its settings, and add its final global model as it is "
        "and with each hospital's own label mix",
    )
    sweep = bench.add_parser(
        "sweep",
        help="privacy/accuracy grid: federated and local at each epsilon, without DP, and pooled",
        description="Runs every cell of a sweep file (simulations/benchmarks/<name>.toml) over its seeds and "
        "writes results.csv, results.json, report.md and accuracy_vs_epsilon.png. Finished runs are kept in "
        "OUT/cells/, so an interrupted sweep resumes where it stopped.",
    )
    sweep.add_argument("--sweep", default="synthetic", help="name in simulations/benchmarks/ or a TOML path")
    sweep.add_argument("--epsilons", help="comma-separated epsilons, e.g. 1,3,8,inf (default: the sweep file's)")
    sweep.add_argument("--seeds", help="comma-separated seeds (default: the sweep file's)")
    sweep.add_argument("--run-config", default="", help="more overrides for every run: 'key=value key2=value2'")
    sweep.add_argument("--out", type=Path, help="output directory (default: runs/benchmark/<sweep name>)")
    sweep.add_argument("--audit-canaries", type=int,
                       help="make each federated cell a white-box epsilon audit with this many canaries at hospital_1 "
                       "(medtune audit) and add the column 'epsilon audited (lower bound)'; the canaries move that "
                       "hospital's updates, so these cells' accuracy is an audited run's")
    tune = bench.add_parser(
        "tune",
        help="score recipes (prompt layer, learning rate, ...) on validation parts of the hospitals' training splits",
        description="Cuts every hospital's training split into fit and validation parts (the test splits are never "
        "read), trains each combination of --grid with DP on the fit parts and prints validation accuracy, "
        "macro-F1 and DP training records/s. Writes OUT/tuning.json.",
    )
    tune.add_argument("--sweep", default="synthetic", help="the hospitals and settings of this sweep file")
    tune.add_argument(
        "--grid", action="append", required=True,
        help="run-config key and TOML list of values, e.g. 'prompt-layer=[0,3,5]' (repeatable: the grid is the product)",
    )
    tune.add_argument(
        "--epsilon", default=str(run_defaults()["epsilon"]), help="each candidate's privacy target (inf: no DP)"
    )
    tune.add_argument("--run-config", default="", help="more overrides for every candidate: 'key=value key2=value2'")
    tune.add_argument("--out", type=Path, help="output directory (default: runs/tuning/<sweep name>)")
    difficulty = bench.add_parser("difficulty", help="synthetic data: pooled vs smallest hospital alone")
    difficulty.add_argument("--hospitals", type=int, help=f"synthetic hospitals (default: {synth_defaults.hospitals})")
    _add_config_flags(difficulty.add_argument_group("model"), ModelConfig)
    _add_config_flags(difficulty.add_argument_group("training"), TrainConfig)
    return parser


def _cmd_synth(args: argparse.Namespace) -> None:
    from medtune.synth import LABELS, write_hospitals

    flags = {"hospitals": args.hospitals, "mean_records": args.records, "dirichlet_alpha": args.alpha,
             "label_noise": args.label_noise, "seed": args.seed}
    config = SynthConfig(**{name: value for name, value in flags.items() if value is not None})
    check_writable(args.out, folder=True)
    for path in write_hospitals(config, args.out):
        print(path)
    print(f"labels: {','.join(LABELS)}")


def _cmd_server_certs(args: argparse.Namespace) -> None:
    from medtune.certs import make_server_certificates

    check_writable(args.out, folder=True)
    files = make_server_certificates(args.out, args.host, rotate=args.rotate)
    print(f"CA certificate (give to every site and `flwr` user): {files.ca_cert}")
    print(f"CA key (keep offline at the coordinator): {files.ca_key}")
    print(f"SuperLink certificate and key: {files.server_cert}, {files.server_key}")


def _cmd_node_keys(args: argparse.Namespace) -> None:
    from medtune.certs import make_node_keys

    check_writable(args.out, folder=True)
    keys = make_node_keys(args.out, args.hospital)
    print(f"private key (stays at the site, --auth-supernode-private-key): {keys.private_key}")
    print(f"public key (send to the coordinator for `flwr supernode register`): {keys.public_key}")


def _cmd_site_run(args: argparse.Namespace) -> int:
    from client.site_runner import run_site
    from medtune.site_file import read_site_file

    return run_site(read_site_file(args.site_file))


def _cmd_site_check(args: argparse.Namespace) -> None:
    import shlex

    from client.site_runner import supernode_command
    from medtune.site_file import read_site_file

    site = read_site_file(args.site_file)
    print(f"{args.site_file}: hospital {site.hospital}, max-epsilon {site.node_config['max-epsilon']}, "
          f"max-delta {site.terms.max_delta:g}, share-evaluation-counts {str(site.terms.share_evaluation_counts).lower()}, "
          f"{len(site.approved_fabs)} approved FAB(s)")
    print(shlex.join(supernode_command(site, site.ledger_path.parent / f".{site.hospital}.superexec-secret")))


def _cmd_site_review(args: argparse.Namespace) -> int:
    from medtune.code_approval import InstalledCode, review

    try:
        fab = args.fab.read_bytes()
    except OSError as error:
        raise ConfigError(f"{args.fab}: cannot read the FAB ({error.strerror or error})") from None
    result = review(fab, InstalledCode.read(), source=str(args.fab))
    print(result.diff, end="")
    print(f"sha256 {result.fab_hash}")
    print(result.summary())
    if result.same_as_installed:
        return 0
    print("to approve it, add its sha256 to the site file's approved-fabs (it then runs as its own code)")
    return 1  # like diff(1): the code differs


def _cmd_train(args: argparse.Namespace) -> None:
    from medtune.backbone import load_backbone
    from medtune.data import read_records
    from medtune.standalone import all_configs, run_local, save_local_run
    from medtune.synth import LABELS, write_hospitals

    labels = tuple(args.labels.split(",")) if args.labels else LABELS
    descriptions = tuple(args.label_descriptions.split("|")) if args.label_descriptions else ()
    data = config_from_dict(DataConfig, {"labels": labels, "label_descriptions": descriptions, **_given(args, DataConfig)})
    model = config_from_dict(ModelConfig, _given(args, ModelConfig))
    privacy = config_from_dict(PrivacyConfig, _given(args, PrivacyConfig))
    train = config_from_dict(TrainConfig, _given(args, TrainConfig))
    check_fits_backbone(model)  # before any record is encoded or cached
    ledger_path = args.ledger or args.out / "ledger.json"
    check_writable(args.out, folder=True)
    check_writable(ledger_path, folder=False, flag="--ledger")
    default_hospital = SynthConfig(hospitals=1, mean_records=1500, dirichlet_alpha=100.0, seed=train.seed)
    path = args.data or write_hospitals(default_hospital, args.out / "synthetic")[0]
    records = read_records(path, data)
    backbone = load_backbone(model.backbone, model.num_layers, train.device)
    print(f"{path}: {len(records)} records; backbone {backbone.name}; target epsilon={privacy.epsilon}")
    run = run_local(
        records, data, model, privacy, train, backbone=backbone, ledger_path=ledger_path, cache_dir=args.out / "features"
    )
    save_local_run(run, args.out, backbone, all_configs(data, model, privacy, train))
    ev = run.evaluation
    print(
        f"test accuracy {ev.accuracy:.3f}  macro-F1 {ev.macro_f1:.3f}  loss {ev.loss:.3f}  ({ev.examples} records)\n"
        f"privacy: epsilon spent {run.ledger.epsilon:.3f} of {privacy.epsilon} (delta={privacy.delta}), "
        f"noise multiplier {run.ledger.noise_multiplier:.3f}, {run.ledger.steps} steps\n"
        f"wrote {args.out}/checkpoint, {ledger_path}, {args.out}/metrics.json"
    )


def _record_counts(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        message = f"--records: expected whole numbers separated by commas (e.g. 2000,8000), got '{text}'"
        raise ConfigError(message) from None


def _cmd_perf(args: argparse.Namespace) -> None:
    from medtune.experiments.perf import run_perf

    if args.records is not None:
        from medtune.experiments.site_memory import run_site_memory

        run_site_memory(_record_counts(args.records), args.work, args.train_args, args.out)
        return
    if args.train_args:
        raise ConfigError(
            f"benchmark perf: flags after -- ({' '.join(args.train_args)}) are for medtune train; add --records N"
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


def _cmd_baselines(args: argparse.Namespace) -> None:
    from medtune.experiments.baselines import load_run, local_only, majority_label, pooled, score_global_model, zero_shot
    from medtune.run_config import parse_overrides, resolve_run_config, settings_from_run_config

    figures = []
    if args.run is not None and (args.scenario or args.run_config):
        raise ConfigError("--run takes the run's own settings (from its results.json); drop --scenario and --run-config")
    if args.out:
        check_writable(args.out, folder=False)
    if args.run is not None:
        settings, _ = load_run(args.run)
        figures += score_global_model(args.run)
    else:
        overrides = parse_overrides(args.run_config)
        settings = settings_from_run_config(resolve_run_config(args.scenario or "default", overrides))
    figures += [local_only(settings), pooled(settings), majority_label(settings), zero_shot(settings)]
    for result in figures:
        print(
            f"{result.name:34s} own test splits: accuracy {result.pooled.accuracy:.3f}  macro-F1 "
            f"{result.pooled.macro_f1:.3f}  mean hospital {result.mean_hospital_accuracy:.3f} | every hospital's "
            f"test split: accuracy {result.everyone.accuracy:.3f}  macro-F1 {result.everyone.macro_f1:.3f}"
        )
    if args.out:
        atomic_write_json(args.out, {"config": settings.run_config, "baselines": [r.to_dict() for r in figures]})


def _cmd_sweep(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from medtune.run_config import parse_overrides
    from medtune.experiments.canary_audit import audit_overrides
    from medtune.experiments.sweep import parse_seed, read_sweep, run_sweep

    sweep = read_sweep(args.sweep)
    changes: dict[str, Any] = {"run_config": {**sweep.run_config, **parse_overrides(args.run_config)}}
    if args.audit_canaries is not None:
        changes["run_config"].update(audit_overrides(args.audit_canaries, "hospital_1", "white-box"))
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

    from medtune.run_config import parse_overrides
    from medtune.experiments.sweep import read_sweep
    from medtune.experiments.tuning import parse_grid, run_tuning

    sweep = read_sweep(args.sweep)
    sweep = replace(sweep, run_config={**sweep.run_config, **parse_overrides(args.run_config)})
    out = args.out or Path("runs/tuning") / sweep.name
    check_writable(out, folder=True)
    run_tuning(sweep, parse_grid(args.grid), read_epsilon(args.epsilon, "--epsilon"), out)
    print(f"wrote {out}/tuning.json")


def _cmd_audit(args: argparse.Namespace) -> None:
    chosen = [flag for flag, value in (("--canaries", args.canaries), ("--score", args.score), ("--run", args.run))
              if value is not None]
    if len(chosen) != 1:
        raise ConfigError(f"medtune audit takes one of --canaries M, --score OUT or --run RUN; got {chosen or 'none'}")
    if args.run is not None:
        _membership_attack(args)
        return
    from medtune.experiments.canary_audit import audit_lines, run_audit, score_audit

    if args.score is not None:
        report = score_audit(args.score)
    else:
        from medtune.run_config import parse_overrides

        if args.out is None:
            raise ConfigError("medtune audit --canaries needs --out: the audit's run is kept there to be scored again")
        check_writable(args.out, folder=True)
        overrides = {**parse_overrides(args.run_config), "out": str(args.out)}
        report = run_audit(args.scenario, overrides, args.canaries, args.hospital or "hospital_1", args.mode)
    print("\n".join(audit_lines(report)))


def _membership_attack(args: argparse.Namespace) -> None:
    from medtune.experiments.audit import audit_run

    if args.hospital is None:
        raise ConfigError("medtune audit --run needs --hospital: the hospital whose records are attacked")
    if args.out:
        check_writable(args.out, folder=False)
    result = audit_run(args.run, args.hospital)
    print(
        f"{args.hospital}: {result.members} members, {result.non_members} non-members; mean loss "
        f"{result.member_loss:.3f} vs {result.non_member_loss:.3f}\n"
        f"loss-threshold attack AUC {result.auc:.3f} (0.5 = chance), TPR at 1% FPR {result.tpr_at_1pct_fpr:.3f}"
    )
    if args.out:
        atomic_write_json(args.out, result.to_dict())


def _cmd_difficulty(args: argparse.Namespace) -> None:
    from medtune.experiments.difficulty import run_difficulty

    train = config_from_dict(TrainConfig, _given(args, TrainConfig))
    model = config_from_dict(ModelConfig, _given(args, ModelConfig))
    check_fits_backbone(model)
    hospitals = {} if args.hospitals is None else {"hospitals": args.hospitals}
    run_difficulty(SynthConfig(**hospitals, seed=train.seed), model, train)


def _cmd_simulate(args: argparse.Namespace) -> None:
    from medtune.files import read_json
    from medtune.own_evaluations import print_own_scores
    from medtune.run_config import parse_overrides
    from medtune.federation.simulation import simulate

    overrides = parse_overrides(args.run_config)
    epsilon = None if args.epsilon is None else read_epsilon(args.epsilon, "--epsilon")
    flags = {"rounds": args.rounds, "epsilon": epsilon, "seed": args.seed, "until-round": args.until_round}
    overrides.update({key: value for key, value in flags.items() if value is not None})
    if args.out is not None:
        check_writable(args.out, folder=True)
        overrides["out"] = str(args.out)
    if args.resume is not None:
        overrides["resume"] = str(args.resume)
        overrides.setdefault("out", str(args.resume if (args.resume / "checkpoints").is_dir() else args.resume.parents[1]))
    results = simulate(args.scenario, overrides, cpus_per_hospital=args.cpus_per_hospital)
    print_own_scores(results.parent, int(read_json(results)["config"]["hospitals"]))
    print(f"wrote {results} and {results.parent / 'checkpoints'}")


def _cmd_predict(args: argparse.Namespace) -> None:
    from medtune.data import read_texts
    from medtune.predict import predict_texts, site_label_mix

    if args.label_column is not None and args.label_mix is None:
        raise ConfigError("--label-column names the label column of the --label-mix file; give --label-mix too")
    blank = [i for i, text in enumerate(args.text or [], start=1) if not text.strip()]
    if blank:
        raise ConfigError(f"--text number {blank[0]} is empty; give the note's text")
    texts = args.text or read_texts(args.input, args.text_column)
    site = None
    if args.label_mix is not None:
        site = site_label_mix(args.checkpoint, args.label_mix, args.text_column, args.label_column or "label", args.backbone)
        shown = "  ".join(f"{label}={share:.3f}" for label, share in site.mix.items())
        print(f"re-weighted to the label mix of {args.label_mix}: {shown}", file=sys.stderr)
    for prediction in predict_texts(args.checkpoint, texts, backbone=args.backbone, site=site):
        print(prediction.format())


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # reads the defaults in pyproject.toml
    except MedTuneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    handlers = {
        ("data", "synth"): _cmd_synth,
        ("certs", "server"): _cmd_server_certs,
        ("certs", "node"): _cmd_node_keys,
        ("site", "run"): _cmd_site_run,
        ("site", "check"): _cmd_site_check,
        ("site", "review"): _cmd_site_review,
        ("train", None): _cmd_train,
        ("simulate", None): _cmd_simulate,
        ("predict", None): _cmd_predict,
        ("benchmark", "perf"): _cmd_perf,
        ("benchmark", "difficulty"): _cmd_difficulty,
        ("benchmark", "baselines"): _cmd_baselines,
        ("benchmark", "sweep"): _cmd_sweep,
        ("benchmark", "tune"): _cmd_tune,
        ("audit", None): _cmd_audit,
    }
    groups = ("data_command", "bench_command", "certs_command", "site_command")
    key = (args.command, next((getattr(args, group) for group in groups if hasattr(args, group)), None))
    quiet_libraries()
    if key != ("site", "run"):  # a site's runner logs with timestamps of its own (client/site_runner.py)
        show_medtune_lines()
    try:
        status = handlers[key](args)  # None, or an exit status of its own (`site run`, `site review`)
    except KeyboardInterrupt:  # Ctrl-C in any other command (a simulation stops itself: medtune/stopping.py)
        command = " ".join(part for part in key if part)
        print(f"interrupted: stopped by SIGINT before `medtune {command}` finished; checkpoints, ledgers and results "
              "are written whole (atomic rename), but a data file or plot it was writing may be cut short", file=sys.stderr)
        return EXIT_STATUS
    except MedTuneError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a folder it cannot write (read-only --out), a full disk: one line, never a traceback
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
