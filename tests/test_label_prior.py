"""The label-name prior: a useful model before any record is used, and one description per label or
a named error."""

from __future__ import annotations

import pytest
import torch

from medtune.config import DataConfig, ModelConfig
from medtune.data import Record
from medtune.errors import ConfigError
from medtune.evaluation import evaluate
from medtune.features import record_inputs
from medtune.label_prior import ZeroShotClassifier, initial_model, label_name_head, label_texts

DATA = DataConfig(
    labels=("1", "2", "3"),
    label_descriptions=("neoplasms", "digestive system diseases", "nervous system diseases"),
)
MODEL = ModelConfig(prompt_length=2, max_length=16, prompt_layer=4)


def test_descriptions_must_match_the_labels_one_to_one():
    with pytest.raises(
        ConfigError, match="gives 2 descriptions for 3 labels .*: label '3' has no description"
    ):
        DataConfig(labels=("1", "2", "3"), label_descriptions=("neoplasms", "digestive"))
    with pytest.raises(ConfigError, match="description 'extra' has no label"):
        DataConfig(labels=("1", "2"), label_descriptions=("a", "b", "extra"))
    assert label_texts(DataConfig(labels=("infectious_disease", "neurology"))) == (
        "infectious disease",
        "neurology",
    )


def test_the_head_starts_as_unit_label_text_embeddings(tiny_backbone):
    model = initial_model(tiny_backbone, MODEL, DATA, seed=0)
    expected = label_name_head(tiny_backbone, label_texts(DATA), MODEL.max_length)
    torch.testing.assert_close(model.head.weight.detach(), expected)
    torch.testing.assert_close(model.head.weight.detach().norm(dim=1), torch.ones(3))
    assert torch.count_nonzero(model.head.bias) == 0
    random_head = initial_model(
        tiny_backbone, ModelConfig(**{**MODEL.__dict__, "head_init": "random"}), DATA, seed=0
    )
    assert not torch.allclose(random_head.head.weight, expected)


def test_zero_shot_puts_a_record_that_reads_like_a_label_under_that_label(tiny_backbone):
    """Even a random encoder embeds a text closest to itself: the prior needs no training to be
    right here."""
    records = [Record(text, label) for label, text in enumerate(DATA.label_descriptions)]
    dataset = record_inputs(tiny_backbone, MODEL, records)
    zero_shot = ZeroShotClassifier(tiny_backbone, MODEL, DATA)
    scored = evaluate(
        zero_shot, dataset, DATA.labels, tiny_backbone.tokenizer.pad_token_id, torch.device("cpu")
    )
    assert scored.accuracy == 1.0
