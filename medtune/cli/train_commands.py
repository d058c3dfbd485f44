"""One hospital alone: `medtune train` (DP training and evaluation) and `medtune predict`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from medtune.cli.flags import add_config_flags, add_data_flags, add_training_flags, given_flags
from medtune.config import (
    DataConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
    check_fits_backbone,
    config_from_dict,
)
from medtune.defaults import run_defaults
from medtune.errors import ConfigError
from medtune.files import check_writable
from medtune.synth_config import SynthConfig


def add_train_commands(commands: Any) -> None:
    train = commands.add_parser("train", help="train one hospital alone, with DP, and evaluate it")
    add_data_flags(train)
    add_config_flags(train.add_argument_group("model"), ModelConfig)
    add_config_flags(train.add_argument_group("privacy"), PrivacyConfig)
    add_training_flags(train)
    train.add_argument(
        "--ledger", type=Path, help="privacy ledger file to continue (default: OUT/ledger.json)"
    )
    train.add_argument("--out", type=Path, default=Path("runs/local"))

    predict = commands.add_parser("predict", help="classify texts with a saved checkpoint")
    predict.add_argument(
        "--checkpoint", type=Path, required=True, help="checkpoint directory (or a run's out dir)"
    )
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", action="append", help="a text to classify (repeatable)")
    source.add_argument(
        "--input", type=Path, help="records file (.csv, .jsonl, .parquet) with a text column"
    )
    predict.add_argument("--text-column", default=run_defaults()["text-column"])
    predict.add_argument(
        "--label-mix",
        type=Path,
        help="this hospital's labelled records (.csv, .jsonl, .parquet): re-weight predictions to "
        "its label mix",
    )
    predict.add_argument(
        "--label-column", help="label column of the --label-mix file (default: label)"
    )
    predict.add_argument(
        "--backbone", help="backbone directory, if not the one named in the checkpoint"
    )

    train.set_defaults(handler=_cmd_train, command_name="train")
    predict.set_defaults(handler=_cmd_predict, command_name="predict")


def _cmd_train(args: argparse.Namespace) -> None:
    from medtune.backbone import load_backbone
    from medtune.data import read_records
    from medtune.standalone import all_configs, run_local, save_local_run
    from medtune.synth import LABELS, write_hospitals

    labels = tuple(args.labels.split(",")) if args.labels else LABELS
    descriptions = tuple(args.label_descriptions.split("|")) if args.label_descriptions else ()
    data = config_from_dict(
        DataConfig,
        {"labels": labels, "label_descriptions": descriptions, **given_flags(args, DataConfig)},
    )
    model = config_from_dict(ModelConfig, given_flags(args, ModelConfig))
    privacy = config_from_dict(PrivacyConfig, given_flags(args, PrivacyConfig))
    train = config_from_dict(TrainConfig, given_flags(args, TrainConfig))
    check_fits_backbone(model)  # before any record is encoded or cached
    ledger_path = args.ledger or args.out / "ledger.json"
    check_writable(args.out, folder=True)
    check_writable(ledger_path, folder=False, flag="--ledger")
    default_hospital = SynthConfig(
        hospitals=1, mean_records=1500, dirichlet_alpha=100.0, seed=train.seed
    )
    path = args.data or write_hospitals(default_hospital, args.out / "synthetic")[0]
    records = read_records(path, data)
    backbone = load_backbone(model.backbone, model.num_layers, train.device)
    print(
        f"{path}: {len(records)} records; backbone {backbone.name}; target "
        f"epsilon={privacy.epsilon}"
    )
    run = run_local(
        records,
        data,
        model,
        privacy,
        train,
        passes=args.passes,
        backbone=backbone,
        ledger_path=ledger_path,
        cache_dir=args.out / "features",
    )
    save_local_run(run, args.out, backbone, all_configs(data, model, privacy, train, args.passes))
    ev = run.evaluation
    print(
        f"test accuracy {ev.accuracy:.3f}  macro-F1 {ev.macro_f1:.3f}  loss {ev.loss:.3f}  "
        f"({ev.examples} records)\n"
        f"privacy: epsilon spent {run.ledger.epsilon:.3f} of {privacy.epsilon} "
        f"(delta={privacy.delta}), noise multiplier {run.ledger.noise_multiplier:.3f}, "
        f"{run.ledger.steps} steps\n"
        f"wrote {args.out}/checkpoint, {ledger_path}, {args.out}/metrics.json"
    )


def _cmd_predict(args: argparse.Namespace) -> None:
    from medtune.data import read_texts
    from medtune.predict import Classifier, predict_texts, site_label_mix

    if args.label_column is not None and args.label_mix is None:
        raise ConfigError(
            "--label-column names the label column of the --label-mix file; give --label-mix too"
        )
    blank = [i for i, text in enumerate(args.text or [], start=1) if not text.strip()]
    if blank:
        raise ConfigError(f"--text number {blank[0]} is empty; give the note's text")
    texts = args.text or read_texts(args.input, args.text_column)
    classifier = Classifier.load(args.checkpoint, args.backbone)
    site = None
    if args.label_mix is not None:
        site = site_label_mix(
            classifier, args.label_mix, args.text_column, args.label_column or "label"
        )
        shown = "  ".join(f"{label}={share:.3f}" for label, share in site.mix.items())
        print(f"re-weighted to the label mix of {args.label_mix}: {shown}", file=sys.stderr)
    for prediction in predict_texts(classifier, texts, site=site):
        print(prediction.format())
