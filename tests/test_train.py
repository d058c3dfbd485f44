"""Local training learns: clearly above chance with and without DP, reproducibly, on the synthetic
notes."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from medtune.config import DataConfig, ModelConfig, PrivacyConfig, TrainConfig
from medtune.data import Record
from medtune.standalone import run_local
from medtune.synth import LABELS

DATA = DataConfig(labels=LABELS)
MODEL = ModelConfig(prompt_length=4, max_length=48)


KEYWORDS = {
    "cardiology": ["troponin", "ecg", "murmur"],
    "pulmonology": ["wheezing", "inhaler", "spirometry"],
    "gastroenterology": ["melena", "lipase", "endoscopy"],
    "neurology": ["aphasia", "seizure", "droop"],
    "infectious_disease": ["cultures", "antibiotics", "sepsis"],
}
FILLER = [
    "patient",
    "presents",
    "with",
    "pain",
    "fatigue",
    "today",
    "history",
    "of",
    "admitted",
    "stable",
]


def _records(seed: int = 0, count: int = 2000) -> list[Record]:
    """Easy notes (one service keyword among filler words): tests the training loop, not the
    task."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        label = i % len(LABELS)
        words = list(rng.choice(FILLER, size=6)) + [str(rng.choice(KEYWORDS[LABELS[label]]))]
        rng.shuffle(words)
        records.append(Record(" ".join(words), label))
    return records


def _majority_rate(run) -> float:
    return max(c.support for c in run.evaluation.per_class) / run.evaluation.examples


@pytest.mark.parametrize("epsilon", [math.inf, 8.0])
def test_tiny_bert_learns_clearly_above_chance(tiny_backbone, epsilon):
    train = TrainConfig(batch_size=64, learning_rate=5e-2)
    run = run_local(
        _records(),
        DATA,
        MODEL,
        PrivacyConfig(epsilon=epsilon),
        train,
        passes=4,
        backbone=tiny_backbone,
        progress=False,
    )
    scored = (
        f"epsilon={epsilon}: accuracy {run.evaluation.accuracy:.3f}, macro-F1 "
        f"{run.evaluation.macro_f1:.3f}, majority {_majority_rate(run):.3f}, spent "
        f"{run.ledger.epsilon}"
    )
    assert run.evaluation.accuracy > _majority_rate(run) + 0.3, scored
    assert run.evaluation.macro_f1 > 0.5, scored  # chance on 5 balanced labels is about 0.2
    if math.isfinite(epsilon):
        assert 0 < run.ledger.epsilon <= epsilon
        assert run.ledger.exhausted


def test_same_seed_same_result(tiny_backbone):
    train = TrainConfig(batch_size=32, seed=5)
    runs = [
        run_local(
            _records()[:200],
            DATA,
            MODEL,
            PrivacyConfig(epsilon=3.0),
            train,
            passes=1,
            backbone=tiny_backbone,
            progress=False,
        )
        for _ in range(2)
    ]
    for name, array in runs[0].model.exchanged_state().items():
        np.testing.assert_array_equal(array, runs[1].model.exchanged_state()[name])
    assert runs[0].evaluation == runs[1].evaluation


# token ids, and hidden states below the prompt (another item shape)
@pytest.mark.parametrize("prompt_layer", [0, 5])
def test_empty_poisson_batches_are_still_counted_noisy_steps(tiny_backbone, prompt_layer, tmp_path):
    """With an expected batch of 1 among 20 records, about a third of Poisson batches are empty, the
    first one of a round included (Opacus then hands it over as a bare list): seeds 0 to 5 meet both
    cases."""
    from medtune.features import record_inputs
    from medtune.model import PromptClassifier
    from medtune.train import new_ledger, train_local

    model_config = replace(MODEL, prompt_layer=prompt_layer)
    # as a site: from its cache
    dataset = record_inputs(tiny_backbone, model_config, _records(count=20), tmp_path)
    train = TrainConfig(batch_size=1)
    for seed in range(6):
        model = PromptClassifier(tiny_backbone, model_config, len(LABELS), seed=0)
        ledger = new_ledger(PrivacyConfig(epsilon=20.0), len(dataset), train.batch_size, 1)
        before = model.exchanged_state()
        result = train_local(
            model,
            dataset,
            ledger,
            train,
            tiny_backbone.tokenizer.pad_token_id,
            seed=seed,
            passes=1,
            progress=False,
        )
        assert result.steps == ledger.steps == 20
        assert ledger.exhausted and 0 < ledger.epsilon <= 20.0
        assert all(np.all(np.isfinite(a)) for a in model.exchanged_state().values())
        assert not np.array_equal(before["prompt"], model.exchanged_state()["prompt"])


def test_poisson_sampling_and_dp_noise_draw_from_independent_streams(tiny_backbone, monkeypatch):
    """Seeded alike, torch's CPU generator gives sampling and noise one stream: which records were
    sampled would be correlated with the noise added to them. Each gets a seed of its own."""
    import opacus

    from medtune.train import RandomStreams

    seen = {}
    original = opacus.PrivacyEngine.make_private

    def recording(self, **kwargs):
        seen["noise"] = kwargs["noise_generator"].initial_seed()
        seen["sampling"] = kwargs["data_loader"].generator.initial_seed()
        return original(self, **kwargs)

    monkeypatch.setattr(opacus.PrivacyEngine, "make_private", recording)
    train = TrainConfig(batch_size=32, seed=5)
    run_local(
        _records(count=64),
        DATA,
        MODEL,
        PrivacyConfig(epsilon=8.0),
        train,
        passes=1,
        backbone=tiny_backbone,
        progress=False,
    )
    assert seen["noise"] != seen["sampling"]
    streams = RandomStreams.from_seed(123)
    assert len({streams.sampling, streams.noise, streams.other, streams.canaries}) == 4
    assert streams == RandomStreams.from_seed(123)  # still reproducible from the round's seed


def test_medtune_train_continues_only_its_own_ledger_for_its_own_records(tiny_backbone, tmp_path):
    """`--ledger other.json` never touches OUT/ledger.json; a ledger of other records or of a
    federated hospital is refused before any step (issue 22, items 3 and 4)."""
    import json

    from medtune.errors import LedgerError
    from medtune.privacy import PrivacyLedger
    from medtune.standalone import save_local_run

    train, privacy = TrainConfig(batch_size=32), PrivacyConfig(epsilon=8.0)
    out, other = tmp_path / "l1", tmp_path / "other.json"
    out.mkdir()
    (out / "ledger.json").write_text("kept as it was")
    run = run_local(
        _records(count=64),
        DATA,
        MODEL,
        privacy,
        train,
        passes=1,
        backbone=tiny_backbone,
        ledger_path=other,
        progress=False,
    )
    save_local_run(run, out, tiny_backbone, {"data": {"labels": list(LABELS)}})
    assert (out / "ledger.json").read_text() == "kept as it was"
    assert json.loads(other.read_text())["steps"] == run.ledger.steps > 0

    stored = other.read_bytes()
    with pytest.raises(LedgerError, match=f"{other} was made for other records"):
        run_local(
            _records(seed=1, count=64),
            DATA,
            MODEL,
            privacy,
            train,
            passes=1,
            backbone=tiny_backbone,
            ledger_path=other,
            progress=False,
        )
    assert other.read_bytes() == stored  # refused before any step

    federated = tmp_path / "hospital_1.json"
    ledger = PrivacyLedger.from_state_dict(json.loads(stored))
    ledger.hospital = "hospital_1"  # a simulated site's ledger, as `medtune simulate` writes it
    federated.write_text(json.dumps(ledger.state_dict()))
    with pytest.raises(
        LedgerError,
        match=f"{federated} is the privacy ledger of hospital 'hospital_1', not of 'local'",
    ):
        run_local(
            _records(count=64),
            DATA,
            MODEL,
            privacy,
            train,
            passes=1,
            backbone=tiny_backbone,
            ledger_path=federated,
            progress=False,
        )


def test_medtune_train_saves_its_total_passes_as_epochs_as_earlier_versions_did():
    """Alone, "epochs" in a run's saved config is its total passes (`--epochs`), as files of
    earlier versions hold it; the per-round local_epochs means nothing alone and is left out."""
    from medtune.standalone import all_configs

    saved = all_configs(DATA, MODEL, PrivacyConfig(), TrainConfig(batch_size=8), passes=7)
    assert saved["train"]["epochs"] == 7 and saved["train"]["batch_size"] == 8
    assert "local_epochs" not in saved["train"]
