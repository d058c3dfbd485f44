"""Shared fixtures: a tiny randomly initialised BERT saved as a local checkpoint directory.

It uses the embedded MiniLM's tokenizer files (local, no download) and a 6-layer, 32-wide
encoder built from a config, so unit tests run in seconds and exercise the real loading path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import BertConfig, BertModel

from medtune.backbone import embedded_backbone_path
from medtune.logs import quiet_libraries

quiet_libraries()
torch.set_num_threads(2)
# Remembered noise searches go to a folder of this test session, never the user's own cache
# (set before any simulation starts, so Ray's workers inherit it).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="medtune-test-cache-")
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def tiny_recipe(backbone: Path) -> dict[str, Any]:
    """Run-config overrides for federations on the tiny backbone: seconds a round on 2 cores.

    The one copy of the tiny settings the federation, robustness, sweep and deployment tests share;
    each adds its hospitals, rounds and timeouts.
    """
    return {
        "backbone": str(backbone),
        "num-layers": 0,
        "prompt-length": 4,
        "max-length": 32,
        "local-epochs": 1,
        "batch-size": 16,
        "learning-rate": 0.05,
    }


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=6,  # as deep as the embedded MiniLM, so every prompt layer can be tested
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=160,
    )
    BertModel(config).save_pretrained(directory)
    source = Path(embedded_backbone_path())
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def tiny_backbone(tiny_backbone_dir: Path):
    from medtune.backbone import load_backbone

    return load_backbone(str(tiny_backbone_dir))
