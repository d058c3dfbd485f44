"""The label-name prior: a head that starts from what the frozen encoder already knows about each
label.

A label's name or short description ("digestive system diseases") is public knowledge, not a
hospital's record, so embedding it costs no privacy. Each head row starts as the standardised,
unit-length sentence embedding of its label's text (the same mean-pool-and-standardise the model
applies to a record), so the initial logit of a label is proportional to the cosine between a
record and that label's text: the global model is a zero-shot classifier at round 0, and training
refines it instead of starting from noise.

The zero-shot reference of the benchmarks is exactly that head on the untouched encoder, with no
prompt and no training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medtune.backbone import Backbone, sentence_embeddings
from medtune.config import DataConfig, ModelConfig
from medtune.model import PromptClassifier


def label_texts(data: DataConfig) -> tuple[str, ...]:
    """Each label's description, or the label itself (underscores read as spaces) where none is
    given."""
    descriptions = data.label_descriptions or ("",) * len(data.labels)
    return tuple(
        d or label.replace("_", " ") for label, d in zip(data.labels, descriptions, strict=True)
    )


@torch.no_grad()
def label_name_head(backbone: Backbone, texts: tuple[str, ...], max_length: int) -> torch.Tensor:
    """(labels, hidden) unit rows: each label text's standardised sentence embedding."""
    encoded = backbone.tokenizer(
        list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    device = next(backbone.encoder.parameters()).device
    pooled = (
        sentence_embeddings(
            backbone.encoder, encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
        )
        .float()
        .cpu()
    )
    standardised = F.layer_norm(pooled, pooled.shape[-1:])
    return standardised / standardised.norm(dim=1, keepdim=True)


@torch.no_grad()
def set_label_name_head(
    head: nn.Linear, backbone: Backbone, model: ModelConfig, data: DataConfig
) -> None:
    """Overwrite a head with the label texts' embeddings and a zero bias."""
    head.weight.copy_(label_name_head(backbone, label_texts(data), model.max_length))
    head.bias.zero_()


def initial_model(
    backbone: Backbone, model: ModelConfig, data: DataConfig, seed: int
) -> PromptClassifier:
    """The federation's (or a lone hospital's) starting prompt and head, as `model.head_init`
    asks."""
    classifier = PromptClassifier(backbone, model, len(data.labels), seed=seed)
    if model.head_init == "label-names":
        set_label_name_head(classifier.head, backbone, model, data)
    return classifier


class ZeroShotClassifier(nn.Module):
    """The untouched encoder's record embedding against each label text's embedding: no prompt, no
    training."""

    def __init__(self, backbone: Backbone, model: ModelConfig, data: DataConfig) -> None:
        super().__init__()
        self.classifier = PromptClassifier(backbone, model, len(data.labels), seed=0)
        self.head = self.classifier.head
        set_label_name_head(self.head, backbone, model, data)

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.classifier.features(inputs, attention_mask, with_prompt=False))
