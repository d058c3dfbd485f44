"""The model: DP per-sample gradients are right, the backbone never changes, only prompt+head are
exchanged."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from torch.utils.data import DataLoader

from medtune.backbone import load_backbone
from medtune.config import ModelConfig, PrivacyConfig, TrainConfig
from medtune.data import PadToLongest, Record
from medtune.errors import ConfigError, StateError
from medtune.features import record_inputs
from medtune.model import PromptClassifier
from medtune.state import HEAD_BIAS, HEAD_WEIGHT, PROMPT
from medtune.train import new_ledger, train_local

TEXTS = [
    "denies chest pain, troponin negative",
    "SOB and wheezing, SpO2 86 percent on room air",
    "melena for two days with epigastric tenderness",
    "left facial droop and arm drift",
    "fever with blood cultures growing gram-positive cocci and a much longer note than the others "
    "here",
    "CP",
]


def _config(prompt_length: int = 4, prompt_layer: int = 5) -> ModelConfig:
    return ModelConfig(prompt_length=prompt_length, max_length=32, prompt_layer=prompt_layer)


def _model(
    backbone, prompt_length: int = 4, seed: int = 0, prompt_layer: int = 5
) -> PromptClassifier:
    return PromptClassifier(backbone, _config(prompt_length, prompt_layer), 5, seed=seed)


def _batch(backbone, prompt_layer: int = 5) -> dict[str, torch.Tensor]:
    dataset = record_inputs(
        backbone,
        _config(prompt_layer=prompt_layer),
        [Record(t, i % 5) for i, t in enumerate(TEXTS)],
    )
    return PadToLongest(backbone.tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])


@pytest.mark.parametrize("prompt_layer", range(7))
def test_opacus_per_sample_gradients_match_brute_force_and_are_clipped(tiny_backbone, prompt_layer):
    model = _model(tiny_backbone, prompt_layer=prompt_layer)
    batch = _batch(tiny_backbone, prompt_layer)
    max_grad_norm = 0.01  # small enough that every record is clipped
    brute = []
    for i in range(len(TEXTS)):
        model.zero_grad()
        logits = model(batch["inputs"][i : i + 1], batch["attention_mask"][i : i + 1])
        F.cross_entropy(logits, batch["labels"][i : i + 1]).backward()
        brute.append([p.grad.detach().clone() for p in model.trainable_parameters()])
    model.zero_grad()

    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    loader = DataLoader(list(range(len(TEXTS))), batch_size=len(TEXTS))
    hooks, dp_optimizer, _ = PrivacyEngine(accountant="prv").make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        poisson_sampling=False,
        wrap_model=False,
    )
    model.train()
    logits = model(batch["inputs"], batch["attention_mask"])
    F.cross_entropy(logits, batch["labels"]).backward()
    max_diff = 0.0
    for index, parameter in enumerate(model.trainable_parameters()):
        expected = torch.stack([per_record[index] for per_record in brute])
        max_diff = max(max_diff, float((parameter.grad_sample - expected).abs().max()))
    shown = (
        f"prompt layer {prompt_layer}: max abs diff Opacus vs brute-force per-sample gradients: "
        f"{max_diff:.2e}"
    )
    assert max_diff < 1e-5, shown

    dp_optimizer.clip_and_accumulate()
    norms = torch.stack(
        [torch.cat([g.flatten() for g in per_record]).norm() for per_record in brute]
    )
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    assert torch.all(norms > max_grad_norm)
    for index, parameter in enumerate(model.trainable_parameters()):
        expected_sum = sum(f * per_record[index] for f, per_record in zip(factors, brute))
        assert torch.allclose(parameter.summed_grad, expected_sum, atol=1e-7)
    hooks.cleanup()


def test_training_leaves_every_backbone_tensor_bitwise_unchanged(tiny_backbone):
    before = {k: v.clone() for k, v in tiny_backbone.encoder.state_dict().items()}
    model = _model(tiny_backbone)
    prompt_before = model.exchanged_state()
    records = [Record(t, i % 5) for i, t in enumerate(TEXTS * 4)]
    dataset = record_inputs(tiny_backbone, model.config, records)
    train, passes = TrainConfig(batch_size=4, learning_rate=0.05), 2
    ledger = new_ledger(PrivacyConfig(epsilon=8.0), len(dataset), train.batch_size, passes)
    train_local(
        model,
        dataset,
        ledger,
        train,
        tiny_backbone.tokenizer.pad_token_id,
        seed=0,
        passes=passes,
        progress=False,
    )
    after = tiny_backbone.encoder.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), f"backbone tensor {name} changed"
    assert all(not p.requires_grad for p in tiny_backbone.encoder.parameters())
    assert not np.array_equal(prompt_before[PROMPT], model.exchanged_state()[PROMPT])


def test_backbone_stays_in_eval_mode_while_the_prompt_trains(tiny_backbone):
    model = _model(tiny_backbone).train()
    assert model.prompt.training and model.head.training
    assert not any(m.training for m in model.encoder.modules())


def test_exchanged_state_is_exactly_prompt_and_head(tiny_backbone):
    model = _model(tiny_backbone, prompt_length=4)
    state = model.exchanged_state()
    assert list(state) == [PROMPT, HEAD_WEIGHT, HEAD_BIAS]
    assert (
        state[PROMPT].shape == (4, 32)
        and state[HEAD_WEIGHT].shape == (5, 32)
        and state[HEAD_BIAS].shape == (5,)
    )
    assert all(a.dtype == np.float32 for a in state.values())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.trainable_parameters()}


def test_loading_exchanged_state_round_trips_and_rejects_anything_else(tiny_backbone):
    source, target = _model(tiny_backbone, seed=1), _model(tiny_backbone, seed=2)
    target.load_exchanged_state(source.exchanged_state())
    for name, array in source.exchanged_state().items():
        np.testing.assert_array_equal(array, target.exchanged_state()[name])
    good = source.exchanged_state()
    with pytest.raises(
        StateError, match="unexpected \\['encoder.embeddings.word_embeddings.weight'\\]"
    ):
        target.load_exchanged_state(
            {**good, "encoder.embeddings.word_embeddings.weight": np.zeros((1, 1), np.float32)}
        )
    with pytest.raises(StateError, match="'prompt' has shape \\(3, 32\\), expected \\(4, 32\\)"):
        target.load_exchanged_state({**good, PROMPT: np.zeros((3, 32), np.float32)})
    with pytest.raises(StateError, match="'head.bias' contains NaN"):
        target.load_exchanged_state({**good, HEAD_BIAS: np.full(5, np.nan, np.float32)})
    with pytest.raises(StateError, match="dtype float64"):
        target.load_exchanged_state({**good, HEAD_BIAS: np.zeros(5)})


def test_prompt_initialisation_from_vocabulary_and_random(tiny_backbone):
    vocab = PromptClassifier(
        tiny_backbone, ModelConfig(prompt_length=4, prompt_init="vocab"), 5, seed=0
    )
    table = tiny_backbone.encoder.get_input_embeddings().weight
    rows = vocab.prompt.embedding.detach()
    assert all(bool((table == row).all(dim=1).any()) for row in rows)
    random = PromptClassifier(
        tiny_backbone, ModelConfig(prompt_length=4, prompt_init="random"), 5, seed=0
    )
    assert not any(
        bool((table == row).all(dim=1).any()) for row in random.prompt.embedding.detach()
    )


def test_truncation_keeps_first_layers_and_rejects_too_many(tiny_backbone_dir):
    assert len(load_backbone(str(tiny_backbone_dir), num_layers=1).encoder.encoder.layer) == 1
    with pytest.raises(ConfigError, match="num_layers=7 but the backbone has only 6 layers"):
        load_backbone(str(tiny_backbone_dir), num_layers=7)


def test_prompt_plus_text_must_fit_the_position_table(tiny_backbone):
    with pytest.raises(ConfigError, match="= 168 tokens exceeds the 160 positions of the backbone"):
        PromptClassifier(tiny_backbone, ModelConfig(prompt_length=40, max_length=128), 5, seed=0)


@pytest.mark.parametrize("prompt_layer", range(7))
def test_late_prompt_on_cached_states_equals_the_prompt_run_through_every_block(
    tiny_backbone, prompt_layer
):
    """Blocks below the prompt layer never see the prompt: caching their output changes nothing."""
    model = _model(tiny_backbone, prompt_layer=prompt_layer, seed=3)
    records = [Record(t, i % 5) for i, t in enumerate(TEXTS)]
    tokens = PadToLongest(tiny_backbone.tokenizer.pad_token_id)(
        [
            record_inputs(tiny_backbone, _config(prompt_layer=0), records)[i]
            for i in range(len(records))
        ]
    )
    on_the_fly = model(
        model.frozen_inputs(tokens["inputs"], tokens["attention_mask"]), tokens["attention_mask"]
    )
    cached = _batch(tiny_backbone, prompt_layer)  # float16 storage, as at a site
    from_cache = model(cached["inputs"], cached["attention_mask"])
    torch.testing.assert_close(from_cache, on_the_fly, atol=5e-3, rtol=1e-3)
    # and one record alone gives the same logits as in a padded batch
    alone = model(
        cached["inputs"][5:6, : int(cached["attention_mask"][5].sum())],
        cached["attention_mask"][5:6, : int(cached["attention_mask"][5].sum())],
    )
    torch.testing.assert_close(alone, from_cache[5:6], atol=1e-5, rtol=1e-4)


def test_a_prompt_layer_beyond_the_backbone_names_the_key_and_the_depth(tiny_backbone):
    with pytest.raises(
        ConfigError, match=r"prompt-layer\) = 7 is outside 0..6: the backbone .* has 6 layers"
    ):
        _model(tiny_backbone, prompt_layer=7)
    with pytest.raises(
        ConfigError,
        match=r"prompt_layer \(prompt-layer\) must be 0 \(input\) or a layer number, got -1",
    ):
        _config(prompt_layer=-1)


def test_a_checkpoint_becomes_a_model_only_on_the_backbone_it_was_trained_on(
    tmp_path, tiny_backbone, tiny_backbone_dir
):
    """predict, audit and baselines all load through model_from_checkpoint: same arrays, hash
    checked."""
    from medtune.checkpoint import Checkpoint, model_from_checkpoint, save_checkpoint
    from medtune.errors import CheckpointError

    trained = _model(tiny_backbone, seed=3)
    config = replace(trained.config, backbone=str(tiny_backbone_dir))
    saved = Checkpoint(
        trained.exchanged_state(),
        ("a", "b", "c", "d", "e"),
        config,
        "tiny",
        tiny_backbone.fingerprint,
        {},
    )
    save_checkpoint(tmp_path / "good", saved)
    checkpoint, model, _ = model_from_checkpoint(tmp_path / "good", device="cpu")
    assert checkpoint.labels == saved.labels
    for name, array in trained.exchanged_state().items():
        np.testing.assert_array_equal(model.exchanged_state()[name], array)
    save_checkpoint(tmp_path / "other", replace(saved, backbone_hash="0" * 64))
    with pytest.raises(CheckpointError, match="different weights hash"):
        model_from_checkpoint(tmp_path / "other", device="cpu")


def test_a_checkpoint_whose_label_list_was_edited_is_refused(tmp_path, tiny_backbone):
    """The head's rows follow the label order: reversed labels in meta.json would name every
    prediction wrongly."""
    import json

    from medtune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from medtune.errors import CheckpointError

    trained = _model(tiny_backbone, seed=3)
    labels = ("a", "b", "c", "d", "e")
    save_checkpoint(
        tmp_path / "run",
        Checkpoint(trained.exchanged_state(), labels, trained.config, "tiny", "0" * 64, {}),
    )
    assert load_checkpoint(tmp_path / "run").labels == labels
    meta_path = tmp_path / "run" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "labels": list(reversed(labels))}))
    with pytest.raises(
        CheckpointError,
        match=r"meta.json: labels \['e', 'd', 'c', 'b', 'a'\] differ from \['a', 'b'",
    ):
        load_checkpoint(tmp_path / "run")
