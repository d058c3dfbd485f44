"""The references a federated run is judged against, on the same hospitals, splits and seed.

- local only: each hospital trains alone on its own train split, with the same privacy target
  and the same number of passes over its data as in the federation (rounds x local epochs),
  and is tested on its own test split;
- pooled: one non-private model on every hospital's train split together (what centralising
  the data would give), tested on every hospital's test split;
- majority label: no model at all, each hospital predicts its most frequent training label. Under
  label skew a hospital's own test split rewards knowing its label mix; this is how much.
- zero-shot: no training at all, the untouched encoder's embedding of each record matched to the
  embeddings of the label names or descriptions (medtune/label_prior.py): what the encoder knows
  before any hospital's record is used.

And the federated model as a hospital would use it at home: the final global prompt and head with
the hospital's own label mix applied (medtune/label_mix.py), on its own test split.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtune.backbone import Backbone, load_backbone, resolve_device
from medtune.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
from medtune.config import PrivacyConfig, federation_passes
from medtune.data import Record, train_test_split
from medtune.errors import ConfigError
from medtune.evaluation import evaluate, predict_logits
from medtune.features import RecordInputs, record_inputs
from medtune.federation.partitions import simulated_hospital
from medtune.federation.results import RESULTS_FILE, RunResults
from medtune.label_mix import apply_label_mix, label_mix, mix_bias
from medtune.label_prior import ZeroShotClassifier, initial_model
from medtune.metrics import Evaluation, from_counts, pool, score_logits
from medtune.model import PromptClassifier
from medtune.noise import NoiseSource
from medtune.run_config import RunSettings, settings_from_run_config
from medtune.train import TrainResult, new_ledger, train_local


@dataclass(frozen=True)
class Split:
    name: str
    train: list[Record]
    test: list[Record]


@dataclass(frozen=True)
class BaselineResult:
    name: str
    pooled: Evaluation  # over every hospital's test split together
    per_hospital: dict[str, Evaluation]
    epsilon_spent: dict[str, float]  # per trained model (inf without DP)
    # Each trained model on every hospital's test split, pooled: how well a hospital's model serves
    # the federation's whole patient mix, not only its own (skewed) one. Equals `pooled` for one
    # model.
    everyone: Evaluation

    @property
    def mean_hospital_accuracy(self) -> float:
        return sum(e.accuracy for e in self.per_hospital.values()) / len(self.per_hospital)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "accuracy": self.pooled.accuracy,
            "macro_f1": self.pooled.macro_f1,
            "mean_hospital_accuracy": self.mean_hospital_accuracy,
            "worst_hospital_accuracy": min(e.accuracy for e in self.per_hospital.values()),
            "accuracy_on_all_hospitals": self.everyone.accuracy,
            "macro_f1_on_all_hospitals": self.everyone.macro_f1,
            "per_hospital": {
                name: {"accuracy": e.accuracy, "macro_f1": e.macro_f1}
                for name, e in self.per_hospital.items()
            },
        }


def splits(settings: RunSettings) -> list[Split]:
    """Every simulated hospital's train/test split, exactly as its Site makes it."""
    result = []
    for partition in range(settings.source.hospitals):
        hospital = simulated_hospital(settings, partition)
        train, test = train_test_split(hospital.records, settings.data.test_fraction, settings.seed)
        result.append(Split(hospital.name, train, test))
    return result


def _fit(
    settings: RunSettings, backbone: Backbone, train: list[Record], epsilon: float, name: str
) -> tuple[PromptClassifier, float]:
    """Train from the run's initial prompt and head for rounds x local epochs, at `epsilon`.

    Returns the model and the epsilon its ledger actually spent.
    """
    model = initial_model(backbone, settings.model, settings.data, seed=settings.seed)
    result = train_alone(
        settings,
        model,
        _inputs(settings, backbone, train),
        backbone.tokenizer.pad_token_id,
        seed=NoiseSource.seeded(settings.seed, name).seed_for(0),
        privacy=replace(settings.privacy, epsilon=epsilon),
    )
    return model, result.epsilon


def train_alone(
    settings: RunSettings,
    model: PromptClassifier,
    dataset: RecordInputs,
    pad_token_id: int,
    seed: int,
    privacy: PrivacyConfig | None = None,
) -> TrainResult:
    """Train `model` on `dataset` with no rounds, for the passes a hospital makes in the run's
    federation and a ledger planned for exactly those, at `privacy` (default: the run's target).

    So a reference trained alone (local only, pooled, a tuning candidate) is compared with the
    federation like with like.
    """
    passes = federation_passes(settings.federation.rounds, settings.train.local_epochs)
    privacy = privacy or settings.privacy
    ledger = new_ledger(privacy, len(dataset), settings.train.batch_size, passes)
    return train_local(
        model,
        dataset,
        ledger,
        settings.train,
        pad_token_id,
        seed=seed,
        passes=passes,
        progress=False,
    )


def _inputs(settings: RunSettings, backbone: Backbone, records: list[Record]) -> RecordInputs:
    """Model inputs of these records, from the run's feature cache when it names one."""
    return record_inputs(backbone, settings.model, records, settings.cache_dir)


def _test(
    settings: RunSettings, backbone: Backbone, model: torch.nn.Module, split: Split
) -> Evaluation:
    dataset = _inputs(settings, backbone, split.test)
    device = resolve_device(settings.train.device)
    return evaluate(model, dataset, settings.data.labels, backbone.tokenizer.pad_token_id, device)


Scorer = Callable[[Split], Evaluation]  # one hospital's model, scored on a hospital's test split


def each_hospital_scored(
    name: str,
    all_splits: list[Split],
    scorer_of: Callable[[Split], Scorer],
    spent: dict[str, float],
) -> BaselineResult:
    """The one scoring loop for methods with a model per hospital (local, majority, global + own
    mix).

    `scorer_of(split)` gives the model of `split`'s hospital. Its own test split makes
    `per_hospital` and `pooled`; every hospital's test split, pooled over all models, makes
    `everyone`.
    """
    per_hospital: dict[str, Evaluation] = {}
    everyone: list[Evaluation] = []
    for own in all_splits:
        score = scorer_of(own)
        on_each = {other.name: score(other) for other in all_splits}
        per_hospital[own.name] = on_each[own.name]
        everyone += on_each.values()
    return BaselineResult(
        name, pool(list(per_hospital.values())), per_hospital, spent, pool(everyone)
    )


def local_only(settings: RunSettings, epsilon: float | None = None) -> BaselineResult:
    """Each hospital alone; `epsilon` defaults to the run's target."""
    epsilon = settings.privacy.epsilon if epsilon is None else epsilon
    backbone = load_backbone(
        settings.model.backbone, settings.model.num_layers, settings.train.device
    )
    spent: dict[str, float] = {}

    def trained_alone(split: Split) -> Scorer:
        model, spent[split.name] = _fit(settings, backbone, split.train, epsilon, split.name)
        return lambda other: _test(settings, backbone, model, other)

    label = "local only" + ("" if math.isinf(epsilon) else f" (DP, epsilon={epsilon:g})")
    return each_hospital_scored(label, splits(settings), trained_alone, spent)


def pooled(settings: RunSettings) -> BaselineResult:
    """All records in one place, no DP: the ceiling federation tries to reach."""
    backbone = load_backbone(
        settings.model.backbone, settings.model.num_layers, settings.train.device
    )
    all_splits = splits(settings)
    model, _ = _fit(
        settings, backbone, [r for s in all_splits for r in s.train], math.inf, "pooled"
    )
    per_hospital = {split.name: _test(settings, backbone, model, split) for split in all_splits}
    together = pool(list(per_hospital.values()))
    return BaselineResult("pooled (no DP)", together, per_hospital, {"pooled": math.inf}, together)


def zero_shot(settings: RunSettings) -> BaselineResult:
    """No training: each record goes to the label whose text embeds closest (the label-name prior
    alone)."""
    backbone = load_backbone(
        settings.model.backbone, settings.model.num_layers, settings.train.device
    )
    model = ZeroShotClassifier(backbone, settings.model, settings.data)
    per_hospital = {
        split.name: _test(settings, backbone, model, split) for split in splits(settings)
    }
    together = pool(list(per_hospital.values()))
    spent = {name: 0.0 for name in per_hospital}
    return BaselineResult(
        "zero-shot (label names, no training)", together, per_hospital, spent, together
    )


def _constant(
    settings: RunSettings, label: int, prior: np.ndarray, test: list[Record]
) -> Evaluation:
    """Predicting `label` for every record; the loss is the log-loss of predicting `prior`."""
    labels = settings.data.labels
    support = [sum(r.label == i for r in test) for i in range(len(labels))]
    predicted = [len(test) if i == label else 0 for i in range(len(labels))]
    correct = [support[i] if i == label else 0 for i in range(len(labels))]
    loss = -sum(math.log(prior[r.label]) for r in test) / max(1, len(test))
    return from_counts(labels, support, predicted, correct, loss)


def majority_label(settings: RunSettings) -> BaselineResult:
    """Each hospital predicts its most frequent training label (ties: the lowest label index)."""

    def most_frequent(split: Split) -> Scorer:
        prior = label_mix([r.label for r in split.train], len(settings.data.labels))
        # smoothing keeps the order of the counts; ties go to the first label
        label = int(np.argmax(prior))
        return lambda other: _constant(settings, label, prior, other.test)

    all_splits = splits(settings)
    spent = {split.name: math.inf for split in all_splits}
    return each_hospital_scored("majority label", all_splits, most_frequent, spent)


def load_run(run: Path) -> tuple[RunSettings, RunResults]:
    """A `medtune simulate` out directory's settings (from its latest checkpoint) and record."""
    if not (run / RESULTS_FILE).is_file():
        raise ConfigError(
            f"{run}: no {RESULTS_FILE} here; give the out directory of a `medtune simulate` run"
        )
    path = find_checkpoint(run)
    config = load_checkpoint(path).extra.get("config")
    if not isinstance(config, dict):
        raise ConfigError(
            f"{path}: its meta.json carries no run config; give the out directory of a `medtune "
            "simulate` run"
        )
    return settings_from_run_config(config), RunResults.load(run, up_to_round=sys.maxsize)


def score_global_model(run: Path) -> tuple[BaselineResult, BaselineResult]:
    """A simulated run's final global prompt and head: as it is, and with each hospital's own label
    mix.

    The global model's logits on each test split are computed once. Re-weighted, each hospital
    applies the bias matched to its training split's label mix (medtune/label_mix.py) to its own
    split ("own test") and, for `everyone`, to every hospital's split.
    The splits are rebuilt from the run's settings, so the run must be a simulation of these
    hospitals.
    """
    settings, results = load_run(run)
    spent = results.epsilon_per_hospital()
    all_splits = splits(settings)
    strangers = sorted(set(spent) - {split.name for split in all_splits})
    if strangers:
        raise ConfigError(
            f"the run has hospitals {strangers} that its settings do not simulate: only a `medtune "
            "simulate` run can be scored again here (a deployed hospital's records stay at its "
            "site)"
        )
    _, model, backbone = model_from_checkpoint(run, device=settings.train.device)
    device = resolve_device(settings.train.device)
    tests = {}
    for split in all_splits:
        dataset = _inputs(settings, backbone, split.test)
        tests[split.name] = (
            predict_logits(model, dataset, backbone.tokenizer.pad_token_id, device),
            dataset.labels,
        )

    def as_it_is(split: Split) -> Scorer:
        return lambda other: score_logits(*tests[other.name], settings.data.labels)

    def with_own_mix(split: Split) -> Scorer:
        mix = label_mix([r.label for r in split.train], len(settings.data.labels))
        own = predict_logits(
            model, _inputs(settings, backbone, split.train), backbone.tokenizer.pad_token_id, device
        )
        bias = mix_bias(own, mix)
        return lambda other: score_logits(
            apply_label_mix(tests[other.name][0], bias), tests[other.name][1], settings.data.labels
        )

    return (
        each_hospital_scored("federated (global model)", all_splits, as_it_is, spent),
        each_hospital_scored("federated + own label mix", all_splits, with_own_mix, spent),
    )
