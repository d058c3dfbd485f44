"""Soft-prompt classifier: P trainable virtual tokens in front of a frozen encoder, a linear head on top.

Forward pass of one record: token ids -> frozen word embeddings -> [prompt; embeddings] ->
frozen encoder (attention mask extended over the prompt) -> mean over non-padding positions ->
standardise -> linear head -> logits. Only the prompt and the head are trainable, and only they are exchanged.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn

from medtune.backbone import Backbone, vocabulary_embeddings
from medtune.config import ModelConfig
from medtune.errors import ConfigError
from medtune.state import HEAD_BIAS, HEAD_WEIGHT, PROMPT, ExchangedStateSpec


class SoftPrompt(nn.Module):
    """P learned embedding vectors, prepended to every sequence of input embeddings.

    Kept as a module (not a bare parameter on the root) so Opacus can attach per-sample hooks.
    """

    def __init__(self, initial: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Parameter(initial.detach().clone().float())

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        batch = inputs_embeds.shape[0]
        prompt = self.embedding.to(inputs_embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        return torch.cat([prompt, inputs_embeds], dim=1)


@register_grad_sampler(SoftPrompt)
def soft_prompt_grad_sample(
    layer: SoftPrompt, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradient of the prompt: each record's gradient w.r.t. its own copy of the prompt.

    `backprops` is dLoss/dOutput for the concatenated sequence (batch, P + L, H); the prompt
    occupies the first P positions, and the prompt was broadcast unchanged to every record.
    """
    prompt_length = layer.embedding.shape[0]
    return {layer.embedding: backprops[:, :prompt_length, :].to(layer.embedding.dtype)}


class PromptClassifier(nn.Module):
    """Frozen encoder + soft prompt + linear head. The encoder stays in eval mode even in train()."""

    def __init__(self, backbone: Backbone, config: ModelConfig, num_labels: int, seed: int) -> None:
        super().__init__()
        if config.max_length + config.prompt_length > backbone.max_positions:
            raise ConfigError(
                f"model.max_length ({config.max_length}) + model.prompt_length ({config.prompt_length}) "
                f"exceeds the backbone's {backbone.max_positions} positions"
            )
        self.config = config
        self.encoder = backbone.encoder
        self.spec = ExchangedStateSpec(config.prompt_length, backbone.hidden_size, num_labels)
        generator = torch.Generator().manual_seed(seed)
        hidden = backbone.hidden_size
        if config.prompt_init == "vocab":
            initial = vocabulary_embeddings(self.encoder, config.prompt_length, generator)
        else:
            initial = torch.randn(config.prompt_length, hidden, generator=generator) * 0.02
        self.prompt = SoftPrompt(initial)
        self.head = nn.Linear(hidden, num_labels)
        with torch.no_grad():
            bound = 1.0 / hidden**0.5
            self.head.weight.uniform_(-bound, bound, generator=generator)
            self.head.bias.zero_()

    def train(self, mode: bool = True) -> "PromptClassifier":
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        word_embeddings = self.encoder.get_input_embeddings()(input_ids)
        inputs_embeds = self.prompt(word_embeddings)
        prompt_mask = attention_mask.new_ones(attention_mask.shape[0], self.config.prompt_length)
        mask = torch.cat([prompt_mask, attention_mask], dim=1)
        hidden = self.encoder(inputs_embeds=inputs_embeds, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        # Standardise the pooled features (no parameters): sentence embeddings share a large common
        # component that would otherwise dominate every per-sample gradient of the head.
        return self.head(F.layer_norm(pooled, pooled.shape[-1:]))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.prompt.embedding, self.head.weight, self.head.bias]

    def exchanged_tensors(self) -> "OrderedDict[str, torch.Tensor]":
        """The live trainable tensors under their exchanged-state names."""
        return OrderedDict(
            [(PROMPT, self.prompt.embedding), (HEAD_WEIGHT, self.head.weight), (HEAD_BIAS, self.head.bias)]
        )

    def exchanged_state(self) -> "OrderedDict[str, np.ndarray]":
        """The prompt and head as float32 numpy arrays: everything a hospital may send."""
        return OrderedDict(
            (name, tensor.detach().to("cpu", torch.float32).numpy().copy())
            for name, tensor in self.exchanged_tensors().items()
        )

    def load_exchanged_state(self, arrays: dict[str, np.ndarray], source: str = "state") -> None:
        """Overwrite prompt and head with checked arrays; nothing else can be loaded this way."""
        checked = self.spec.check(arrays, source)
        with torch.no_grad():
            for name, tensor in self.exchanged_tensors().items():
                tensor.copy_(torch.from_numpy(checked[name]).to(tensor.device, tensor.dtype))
