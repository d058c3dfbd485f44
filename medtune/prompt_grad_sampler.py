"""Opacus's per-sample gradient for the soft prompt, registered on import (medtune/train.py imports
it), and typed access to the per-sample gradients Opacus keeps on each parameter (`grad_sample`).

Opacus keeps grad samplers beside the layer they serve; this one lives apart from `SoftPrompt`
(medtune/model.py) because the coordinator builds the initial model to send round 1 and must not
import Opacus or anything that trains. Per-sample gradients are checked against brute force at
every prompt layer in tests/test_model.py.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

from medtune.model import SoftPrompt


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


def per_sample_gradients(parameter: torch.Tensor) -> torch.Tensor:
    """The (records, *shape) per-sample gradients Opacus's hooks left on `parameter`. Opacus hands
    an empty Poisson batch over as a list of tensors, joined here."""
    found = getattr(parameter, "grad_sample")
    return torch.cat(found) if isinstance(found, list) else found


def set_per_sample_gradients(parameter: torch.Tensor, rows: torch.Tensor) -> None:
    """Replace `parameter`'s per-sample gradients, which Opacus's step then clips and noises."""
    setattr(parameter, "grad_sample", rows)
