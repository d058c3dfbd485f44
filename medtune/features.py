"""What the model reads for each record: token ids, or the frozen blocks' output cached at the site.

With the prompt at the input (prompt layer 0) a record is its token ids. With a late prompt
(layer k > 0) blocks 0..k-1 of the frozen encoder never see the prompt, so their output for a
record is the same every step, epoch and round: it is computed once and stored in a feature cache.

The cache never leaves the site. It sits on the site's disk as one memory-mapped float16 array
(every record's tokens back to back) plus offsets, so a hospital of any size trains in bounded
memory. Its directory name is a hash of everything the stored numbers depend on: the backbone's
weights hash, the prompt layer, and the token ids themselves (so the tokenizer, max length and
the record texts are all covered). A changed backbone or setting therefore never finds a stale
cache; a cache whose bytes no longer match their recorded checksum is rebuilt, with its path logged.
Without a cache directory (prediction, audits) the same float16 numbers are kept in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from medtune.backbone import Backbone, check_fits_loaded, hidden_states_at
from medtune.config import ModelConfig
from medtune.data import PadToLongest, Record, TokenizedRecords
from medtune.errors import DataError
from medtune.files import atomic_write_json

log = logging.getLogger("medtune.features")

# 2: a checksum for every file (1: hidden.npy only; rebuilt)
CACHE_FORMAT = "medtune-feature-cache/2"
STORAGE_DTYPE = np.float16  # halves the cache; the prompt and head still train in float32
HIDDEN_FILE, OFFSETS_FILE, META_FILE = "hidden.npy", "offsets.npy", "meta.json"
CHECKED_FILES = (HIDDEN_FILE, OFFSETS_FILE)
ENCODE_BATCH = 64


class HiddenStates(Dataset):
    """Each record's cached hidden states (tokens x hidden, float32 on read) and its label."""

    def __init__(self, hidden: np.ndarray, offsets: np.ndarray, labels: torch.Tensor) -> None:
        # (all tokens, hidden size): a read-only memory map or an in-memory array
        self.hidden = hidden
        self.offsets = offsets  # record i is hidden[offsets[i]:offsets[i + 1]]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        return torch.from_numpy(np.asarray(self.hidden[start:stop], dtype=np.float32)), self.labels[
            index
        ]

    @property
    def bytes_per_record(self) -> float:
        return self.hidden.nbytes / max(1, len(self))


# what a PromptClassifier reads, per its prompt layer
RecordInputs = TokenizedRecords | HiddenStates


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached numbers depend on; its digest names the cache directory."""

    backbone_hash: str
    prompt_layer: int
    tokens_digest: str
    max_length: int
    tokenizer: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.__dict__, sort_keys=True).encode()).hexdigest()


def tokens_digest(tokens: TokenizedRecords) -> str:
    """Every record's token ids as int64 bytes, as before ids were stored compactly: older caches
    stay valid."""
    digest = hashlib.sha256()
    for index in range(len(tokens)):
        digest.update(tokens.ids_of(index).astype(np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fill(
    hidden: np.ndarray,
    offsets: np.ndarray,
    tokens: TokenizedRecords,
    backbone: Backbone,
    layer: int,
) -> None:
    """Run blocks 0..layer-1 over every record, longest first in batches, into `hidden`."""
    # stable: equal lengths keep the records' order
    order = np.argsort(-tokens.lengths, kind="stable")
    collate = PadToLongest(backbone.tokenizer.pad_token_id)
    device = next(backbone.encoder.parameters()).device
    # A large site takes minutes here: records/s and the time left, on a terminal (disable=None: not
    # in logs).
    with tqdm(
        total=len(order), desc="feature cache", unit="record", disable=None, leave=False
    ) as bar:
        for start in range(0, len(order), ENCODE_BATCH):
            batch = order[start : start + ENCODE_BATCH].tolist()
            padded = collate([tokens[i] for i in batch])
            ids, mask = padded["inputs"].to(device), padded["attention_mask"].to(device)
            states = hidden_states_at(backbone.encoder, ids, mask, layer).float().cpu().numpy()
            for row, index in enumerate(batch):
                hidden[offsets[index] : offsets[index + 1]] = states[
                    row, : offsets[index + 1] - offsets[index]
                ]
            bar.update(len(batch))


def _load(directory: Path, key: CacheKey, labels: torch.Tensor) -> HiddenStates | None:
    """The cache in `directory` if it is whole and made for `key`; None (with the reason logged) if
    not."""
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        if meta.get("format") != CACHE_FORMAT or meta.get("key") != key.__dict__:
            raise ValueError("it was made for another backbone, layer or set of records")
        # every file the cache is read from: offsets move record boundaries
        for name in CHECKED_FILES:
            if file_sha256(directory / name) != meta["sha256"][name]:
                raise ValueError(f"{name} does not match its recorded checksum")
        hidden = np.load(directory / HIDDEN_FILE, mmap_mode="r")
        offsets = np.load(directory / OFFSETS_FILE)
        if len(offsets) != len(labels) + 1 or int(offsets[-1]) != hidden.shape[0]:
            raise ValueError("its offsets do not match its records")
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("feature cache %s is damaged (%s); rebuilding it", directory, error)
        return None
    return HiddenStates(hidden, offsets, labels)


def _reserve(path: Path, directory: Path) -> None:
    """Claim the file's whole size on disk before it is filled.

    Writing into a memory map on a full disk kills the process (SIGBUS) half-way through the build,
    with no message and the half-built folder left behind; claimed up front, a short disk is an
    error.
    """
    if not hasattr(os, "posix_fallocate"):  # macOS: written as it is filled, as before
        return
    with path.open("r+b") as handle:
        size = os.fstat(handle.fileno()).st_size
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as error:
            raise DataError(
                f"feature cache {directory}: needs {size / 2**30:.2f} GiB on its disk "
                f"({error.strerror}); free that space, give the cache a bigger disk (cache-dir; "
                "--out for medtune train) or lower max-length"
            ) from None


def _build(
    directory: Path, key: CacheKey, tokens: TokenizedRecords, backbone: Backbone, layer: int
) -> None:
    """Write the cache beside its final place, then move it there in one step."""
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    offsets = tokens.offsets
    try:
        hidden = np.lib.format.open_memmap(
            partial / HIDDEN_FILE,
            mode="w+",
            dtype=STORAGE_DTYPE,
            shape=(int(offsets[-1]), backbone.hidden_size),
        )
        _reserve(partial / HIDDEN_FILE, directory)
        _fill(hidden, offsets, tokens, backbone, layer)
        hidden.flush()
        del hidden
        np.save(partial / OFFSETS_FILE, offsets)
        atomic_write_json(
            partial / META_FILE,
            {
                "format": CACHE_FORMAT,
                "key": key.__dict__,
                "records": len(tokens),
                "sha256": {name: file_sha256(partial / name) for name in CHECKED_FILES},
            },
        )
    except BaseException:  # Ctrl-C or a full disk mid-build: no half-built folder is left behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(directory, ignore_errors=True)
    try:
        partial.rename(directory)
    except OSError:  # another process of the same site finished the same cache first
        shutil.rmtree(partial, ignore_errors=True)


def record_inputs(
    backbone: Backbone,
    config: ModelConfig,
    records: Sequence[Record],
    cache_root: Path | None = None,
) -> RecordInputs:
    """The dataset a PromptClassifier of `config` trains and predicts on, for these records.

    Prompt layer 0: token ids. Prompt layer k > 0: blocks 0..k-1's output per record, from the
    cache under `cache_root` (built on first use), or computed in memory when `cache_root` is None.
    """
    check_fits_loaded(backbone, config)
    tokens = TokenizedRecords(records, backbone.tokenizer, config.max_length)
    layer = config.prompt_layer
    if layer == 0:
        return tokens
    if cache_root is None:
        offsets = tokens.offsets
        hidden = np.empty((int(offsets[-1]), backbone.hidden_size), dtype=STORAGE_DTYPE)
        _fill(hidden, offsets, tokens, backbone, layer)
        return HiddenStates(hidden, offsets, tokens.labels)
    key = CacheKey(
        backbone_hash=backbone.fingerprint,
        prompt_layer=layer,
        tokens_digest=tokens_digest(tokens),
        max_length=config.max_length,
        tokenizer=type(backbone.tokenizer).__name__ + f"/{len(backbone.tokenizer)}",
    )
    directory = cache_root / key.digest[:24]
    cached = _load(directory, key, tokens.labels) if directory.exists() else None
    if cached is None:
        _build(directory, key, tokens, backbone, layer)
        cached = _load(directory, key, tokens.labels)
        if cached is None:
            raise DataError(
                f"feature cache {directory} could not be written and read back; check that disk"
            )
        log.info(
            "feature cache %s: %d records, %.1f KiB per record (blocks below layer %d)",
            directory,
            len(cached),
            cached.bytes_per_record / 1024,
            layer,
        )
    return cached
