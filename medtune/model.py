"""Soft-prompt classifier: P trainable virtual tokens inside a frozen encoder, a linear head on top.

The prompt enters at layer k (`prompt_layer`). With k = 0 (the classic input prompt) a record goes:
token ids -> frozen word embeddings -> [prompt; embeddings] -> all frozen blocks. With k > 0 (a late
prompt, Liu et al., Findings of EMNLP 2022) the blocks below k see only the record, so their output
is computed once per record and cached at the site (medtune/features.py); each training step then
runs [prompt; cached hidden states] -> blocks k..L. Either way: attention mask extended over the
prompt -> mean over non-padding positions -> standardise -> linear head -> logits. Only the prompt
and the head are trainable, and only they are exchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medtune.backbone import (
    Backbone,
    check_fits_loaded,
    hidden_states_at,
    run_layers,
    vocabulary_embeddings,
)
from medtune.config import ModelConfig
from medtune.state import HEAD_BIAS, HEAD_WEIGHT, PROMPT, ExchangedStateSpec


class SoftPrompt(nn.Module):
    """P learned vectors, prepended to every sequence of hidden states entering the prompt layer.

    Kept as a module (not a bare parameter on the root) so Opacus can attach per-sample hooks; its
    per-sample gradient is medtune/prompt_grad_sampler.py.
    """

    def __init__(self, initial: torch.Tensor) -> None:
        super().__init__()
        self.embedding = nn.Parameter(initial.detach().clone().float())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch = hidden.shape[0]
        prompt = self.embedding.to(hidden.dtype).unsqueeze(0).expand(batch, -1, -1)
        return torch.cat([prompt, hidden], dim=1)


class PromptClassifier(nn.Module):
    """Frozen encoder + soft prompt + linear head. The encoder stays in eval mode even in
    train()."""

    def __init__(self, backbone: Backbone, config: ModelConfig, num_labels: int, seed: int) -> None:
        super().__init__()
        check_fits_loaded(backbone, config)
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

    @torch.no_grad()
    def frozen_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What `forward` takes for these tokens: the ids themselves (k = 0) or block k's input
        (k > 0).

        It depends only on the frozen encoder, never on the prompt or head, so a site computes it
        once.
        """
        if self.config.prompt_layer == 0:
            return input_ids
        return hidden_states_at(self.encoder, input_ids, attention_mask, self.config.prompt_layer)

    def features(
        self, inputs: torch.Tensor, attention_mask: torch.Tensor, with_prompt: bool = True
    ) -> torch.Tensor:
        """Standardised mean-pooled encoder output, with the prompt in place (or without, for
        zero-shot)."""
        layer = self.config.prompt_layer
        if layer == 0:
            hidden = self.encoder.get_input_embeddings()(inputs)
        else:
            if not inputs.is_floating_point():
                raise TypeError(
                    f"the prompt enters at layer {layer}: pass the cached hidden states of "
                    "medtune.features.record_inputs (or frozen_inputs(...)), not token ids"
                )
            hidden = inputs.to(self.head.weight.dtype)
        if with_prompt:
            hidden = self.prompt(hidden)
            prompt_mask = attention_mask.new_ones(
                attention_mask.shape[0], self.config.prompt_length
            )
            attention_mask = torch.cat([prompt_mask, attention_mask], dim=1)
        if layer == 0:
            hidden = self.encoder(
                inputs_embeds=hidden, attention_mask=attention_mask
            ).last_hidden_state
        else:
            hidden = run_layers(self.encoder, hidden, attention_mask, layer)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        # Standardise the pooled features (no parameters): sentence embeddings share a large common
        # component that would otherwise dominate every per-sample gradient of the head.
        return F.layer_norm(pooled, pooled.shape[-1:])

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits from `frozen_inputs(...)` of a batch: token ids (k = 0) or cached hidden states
        (k > 0)."""
        return self.head(self.features(inputs, attention_mask))

    def trainable_parameters(self) -> list[nn.Parameter]:
        # torch's stubs type Linear.weight as a Tensor; it is a Parameter (Linear.__init__ makes it
        # one)
        return [self.prompt.embedding, cast(nn.Parameter, self.head.weight), self.head.bias]

    def exchanged_tensors(self) -> "OrderedDict[str, torch.Tensor]":
        """The live trainable tensors under their exchanged-state names."""
        return OrderedDict(
            [
                (PROMPT, self.prompt.embedding),
                (HEAD_WEIGHT, self.head.weight),
                (HEAD_BIAS, self.head.bias),
            ]
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
