"""One hospital on its own: read its file, split, train with DP, evaluate, save checkpoint and
ledger.

This is the path a record takes inside one site, with nothing federated: CSV row -> Record ->
tokens -> frozen blocks below the prompt layer (cached under OUT/features) -> prompt + upper
blocks -> loss -> clipped, noised step (ledger) -> exchanged state.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medtune.backbone import Backbone, load_backbone, resolve_device
from medtune.checkpoint import Checkpoint, save_checkpoint
from medtune.config import DataConfig, ModelConfig, PrivacyConfig, TrainConfig, config_to_dict
from medtune.data import Record, train_test_split, warn_if_thin
from medtune.evaluation import evaluate
from medtune.features import record_inputs
from medtune.files import atomic_write_json
from medtune.label_prior import initial_model
from medtune.ledger_file import load_or_create_ledger, records_digest
from medtune.locks import exclusive
from medtune.metrics import Evaluation
from medtune.model import PromptClassifier
from medtune.noise import NoiseSource
from medtune.privacy import PrivacyLedger
from medtune.train import TrainResult, train_local

# The hospital a `medtune train` ledger belongs to: a federated site's ledger (hospital_1, ...) is
# refused.
LOCAL_HOSPITAL = "local"


@dataclass
class LocalRun:
    result: TrainResult
    evaluation: Evaluation
    ledger: PrivacyLedger
    model: PromptClassifier


def run_local(
    records: list[Record],
    data: DataConfig,
    model_config: ModelConfig,
    privacy: PrivacyConfig,
    train: TrainConfig,
    *,
    passes: int,
    backbone: Backbone | None = None,
    ledger_path: Path | None = None,
    progress: bool = True,
    cache_dir: Path | None = None,
) -> LocalRun:
    """Split by seed, train `passes` passes on the train part, evaluate on the test part.

    Alone, a hospital has no rounds: `passes` is its total (`medtune train --epochs`), and a fresh
    ledger is planned for exactly that; `train.local_epochs` (per federation round) is not used.

    `cache_dir` keeps the frozen blocks' output per record on disk (see medtune/features.py).
    """
    backbone = backbone or load_backbone(
        model_config.backbone, model_config.num_layers, train.device
    )
    train_records, test_records = train_test_split(records, data.test_fraction, train.seed)
    warn_if_thin("this site", [record.label for record in train_records])
    train_set = record_inputs(backbone, model_config, train_records, cache_dir)
    test_set = record_inputs(backbone, model_config, test_records, cache_dir)
    model = initial_model(backbone, model_config, data, seed=train.seed)
    pad = backbone.tokenizer.pad_token_id
    # The ledger is held from reading to writing back: a second process training on it meanwhile
    # would have its steps overwritten.
    with (
        exclusive(ledger_path, "this privacy ledger") if ledger_path is not None else nullcontext()
    ):
        ledger = load_or_create_ledger(
            ledger_path,
            privacy,
            len(train_set),
            train.batch_size,
            planned_passes=passes,
            hospital=LOCAL_HOSPITAL,
            records=records_digest(train_records),
        )
        # seeded noise, reproducible by seed; a second run on one ledger draws fresh noise
        # (medtune/noise.py)
        seed = NoiseSource.seeded(train.seed, LOCAL_HOSPITAL).seed_for(ledger.steps)
        result = train_local(
            model, train_set, ledger, train, pad, seed=seed, passes=passes, progress=progress
        )
        if ledger_path is not None:
            atomic_write_json(ledger_path, ledger.state_dict())
    evaluation = evaluate(model, test_set, data.labels, pad, resolve_device(train.device))
    return LocalRun(result=result, evaluation=evaluation, ledger=ledger, model=model)


def save_local_run(run: LocalRun, out: Path, backbone: Backbone, configs: dict[str, Any]) -> None:
    """checkpoint/ and metrics.json under `out`; the ledger was written where `run_local` continued
    it."""
    save_checkpoint(
        out / "checkpoint",
        Checkpoint(
            arrays=run.model.exchanged_state(),
            labels=tuple(configs["data"]["labels"]),
            model=run.model.config,
            backbone_name=backbone.name,
            backbone_hash=backbone.fingerprint,
            extra={"config": configs},
        ),
    )
    atomic_write_json(
        out / "metrics.json",
        {"train": run.result.metrics(), "test": run.evaluation.to_dict(), "config": configs},
    )


def all_configs(
    data: DataConfig, model: ModelConfig, privacy: PrivacyConfig, train: TrainConfig, passes: int
) -> dict[str, Any]:
    """What a `medtune train` run was given, as its checkpoint and metrics.json keep it.

    Its "train" section's "epochs" is the run's total passes (`--epochs`), as earlier versions
    wrote it, so old and new files read alike; the per-round `local_epochs` means nothing alone
    and is left out.
    """
    alone = {key: value for key, value in config_to_dict(train).items() if key != "local_epochs"}
    return {
        "data": config_to_dict(data),
        "model": config_to_dict(model),
        "privacy": config_to_dict(privacy),
        "train": {"epochs": passes, **alone},
    }
