"""The feature cache: built once per site, never reused for other settings, rebuilt when damaged,
memory-mapped."""

from __future__ import annotations

import errno
import hashlib
import logging
import os

import numpy as np
import pytest
import torch

import medtune.features as features
from medtune.config import ModelConfig
from medtune.data import Record, TokenizedRecords
from medtune.errors import DataError
from medtune.features import HIDDEN_FILE, OFFSETS_FILE, HiddenStates, record_inputs

TEXTS = [
    "chest pain radiating to the left arm",
    "wheezing",
    "melena and epigastric pain for two days",
    "aphasia",
]
RECORDS = [Record(t, i % 2) for i, t in enumerate(TEXTS)]
CONFIG = ModelConfig(prompt_length=2, max_length=16, prompt_layer=3)


@pytest.fixture()
def builds(monkeypatch):
    """Counts how often the frozen blocks actually run over a record set."""
    calls = []
    original = features._fill

    def counting(*args):
        calls.append(args[-1])
        return original(*args)

    monkeypatch.setattr(features, "_fill", counting)
    return calls


def _entries(root):
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def test_cache_is_built_once_and_read_back_memory_mapped(tiny_backbone, tmp_path, builds, caplog):
    with caplog.at_level(logging.INFO, logger="medtune.features"):
        first = record_inputs(tiny_backbone, CONFIG, RECORDS, tmp_path)
    assert "KiB per record" in caplog.text and str(tmp_path) in caplog.text
    second = record_inputs(tiny_backbone, CONFIG, RECORDS, tmp_path)
    assert builds == [3]
    assert isinstance(second, HiddenStates) and isinstance(second.hidden, np.memmap)
    for i in range(len(RECORDS)):
        torch.testing.assert_close(first[i][0], second[i][0], rtol=0, atol=0)
        assert first[i][1] == RECORDS[i].label
    in_memory = record_inputs(tiny_backbone, CONFIG, RECORDS)
    # same float16 numbers
    torch.testing.assert_close(in_memory[2][0], second[2][0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "change",
    [
        {"prompt_layer": 2},
        {"max_length": 4},
    ],
)
def test_another_setting_never_reuses_the_cache(tiny_backbone, tmp_path, builds, change):
    record_inputs(tiny_backbone, CONFIG, RECORDS, tmp_path)
    other = ModelConfig(**{**CONFIG.__dict__, **change})
    record_inputs(tiny_backbone, other, RECORDS, tmp_path)
    assert len(builds) == 2 and len(_entries(tmp_path)) == 2


def test_other_records_or_another_backbone_never_reuse_the_cache(
    tiny_backbone, tiny_backbone_dir, tmp_path, builds
):
    from medtune.backbone import load_backbone

    record_inputs(tiny_backbone, CONFIG, RECORDS, tmp_path)
    record_inputs(tiny_backbone, CONFIG, RECORDS[:3], tmp_path)
    truncated = load_backbone(str(tiny_backbone_dir), num_layers=4)  # other weights, other hash
    record_inputs(truncated, CONFIG, RECORDS, tmp_path)
    assert len(builds) == 3 and len(_entries(tmp_path)) == 3


def _flip_last_numbers(path):
    data = bytearray(path.read_bytes())
    data[-8:] = b"\xff" * 8
    path.write_bytes(bytes(data))


def _move_a_record_boundary(path):
    offsets = np.load(path)
    offsets[1] += 1  # record 0 gains a token of record 1: same length, same total, wrong states
    np.save(path, offsets)


@pytest.mark.parametrize(
    ("damaged", "damage"),
    [(HIDDEN_FILE, _flip_last_numbers), (OFFSETS_FILE, _move_a_record_boundary)],
)
def test_a_damaged_cache_is_rebuilt_with_its_path_named(
    tiny_backbone, tmp_path, builds, caplog, damaged, damage
):
    good = record_inputs(tiny_backbone, CONFIG, RECORDS, tmp_path)
    expected = [good[i][0].clone() for i in range(len(RECORDS))]
    directory = tmp_path / _entries(tmp_path)[0]
    del good
    damage(directory / damaged)
    with caplog.at_level(logging.WARNING, logger="medtune.features"):
        rebuilt = record_inputs(tiny_backbone, CONFIG, RECORDS, tmp_path)
    assert (
        f"feature cache {directory} is damaged ({damaged} does not match its recorded checksum)"
        in caplog.text
    )
    assert len(builds) == 2
    for i in range(len(RECORDS)):
        torch.testing.assert_close(rebuilt[i][0], expected[i], rtol=0, atol=0)


def test_prompt_layer_zero_reads_token_ids_and_caches_nothing(tiny_backbone, tmp_path, builds):
    dataset = record_inputs(
        tiny_backbone, ModelConfig(max_length=16, prompt_layer=0), RECORDS, tmp_path
    )
    assert dataset[0][0].dtype == torch.long and not builds and not list(tmp_path.iterdir())


def test_a_cache_build_stopped_half_way_leaves_nothing_behind(tiny_backbone, tmp_path, monkeypatch):
    """Ctrl-C while the cache is built: the half-built folder is removed, and the next run builds it
    whole."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(features, "_fill", interrupted)
    with pytest.raises(KeyboardInterrupt):
        record_inputs(tiny_backbone, CONFIG, RECORDS, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no .partial-PID folder
    monkeypatch.undo()
    assert len(record_inputs(tiny_backbone, CONFIG, RECORDS, tmp_path)) == len(RECORDS)


@pytest.mark.skipif(
    not hasattr(os, "posix_fallocate"),
    reason="the cache's size is claimed up front where the OS can",
)
def test_a_disk_too_small_for_the_cache_is_an_error_before_any_record_is_encoded(
    tiny_backbone, tmp_path, builds, monkeypatch
):
    """Filling a memory map on a full disk would kill the process (SIGBUS) mid-build; claimed first,
    it is one message."""

    def full_disk(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(features.os, "posix_fallocate", full_disk)
    with pytest.raises(
        DataError,
        match=r"feature cache .*: needs 0\.00 GiB on its disk \(No space left on device\)",
    ):
        record_inputs(tiny_backbone, CONFIG, RECORDS, tmp_path)
    assert not builds and list(tmp_path.iterdir()) == []


def test_compact_token_ids_hash_as_before_so_existing_caches_are_found(tiny_backbone):
    """The cache folder's name covers each record's ids as int64 bytes, as when ids were kept one
    tensor a record."""
    expected = hashlib.sha256()
    for record in RECORDS:
        ids = tiny_backbone.tokenizer(record.text, truncation=True, max_length=16)["input_ids"]
        expected.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
    tokens = TokenizedRecords(RECORDS, tiny_backbone.tokenizer, max_length=16)
    assert features.tokens_digest(tokens) == expected.hexdigest()
