"""A hospital's records: read from CSV, JSONL or Parquet, checked row by row, split, tokenized,
batched.

Rows are numbered from 1 for the first record (the CSV header is not a row). Every problem is
raised as a DataError naming the file, the row and what is wrong; nothing is skipped silently.

A site may hold a million records, so a file is read as a stream, and past its text a record
costs 2 bytes a token: token ids sit in one flat array, not in an object per record or per id.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from medtune.config import DataConfig
from medtune.errors import DataError

SUPPORTED_SUFFIXES = (".csv", ".jsonl", ".parquet")
TOKENIZE_CHUNK = 256  # records per tokenizer call: bounds its per-token Python and Rust objects
PARQUET_BATCH = 4096  # rows decoded at a time

log = logging.getLogger("medtune.data")


@dataclass(frozen=True, slots=True)  # slots: no per-record __dict__ (56 bytes a record, not 96)
class Record:
    text: str
    label: int


# a file's columns, and its rows numbered from 1
Rows = tuple[list[str], Iterator[tuple[int, dict]]]


def _not_utf8(path: Path) -> DataError:
    """The first byte of `path` that is not UTF-8, by line and offset: the streaming decoder saw
    only a chunk."""
    offset = 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                bad = line[error.start : error.start + 1].hex()
                return DataError(
                    f"{path} line {number}: not valid UTF-8 (byte 0x{bad} at offset "
                    f"{offset + error.start}); save the file as UTF-8"
                )
            offset += len(line)
    return DataError(f"{path}: not valid UTF-8; save the file as UTF-8")


def _csv_rows(path: Path, handle: BinaryIO) -> Rows:
    # Python's csv refuses a field over 128 KiB; a note as long as the file is read (max-length
    # truncates it), never refused.
    csv.field_size_limit(max(csv.field_size_limit(), path.stat().st_size + 1))
    reader = csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8-sig", newline=""))
    try:
        columns = reader.fieldnames or []
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    repeated = sorted({column for column in columns if columns.count(column) > 1})
    if repeated:
        raise DataError(
            f"{path} header: column(s) {repeated} appear more than once; rename or remove the "
            "copies"
        )

    def rows() -> Iterator[tuple[int, dict]]:
        try:
            for number, row in enumerate(reader, start=1):
                if None in row:
                    raise DataError(
                        f"{path} row {number}: has more fields than the header's {len(columns)}"
                    )
                yield number, row
        except csv.Error as error:
            raise DataError(f"{path} row {reader.line_num}: malformed CSV ({error})") from None
        except UnicodeDecodeError:
            raise _not_utf8(path) from None

    return list(columns), rows()


def _jsonl_rows(path: Path, handle: BinaryIO) -> Rows:
    """Two passes over the file: the first checks every line and gathers the columns, the second
    yields the rows."""
    text = io.TextIOWrapper(handle, encoding="utf-8-sig")

    def objects() -> Iterator[tuple[int, dict]]:
        text.seek(0)
        try:
            for number, line in enumerate(text, start=1):
                if not line.strip():
                    continue
                try:
                    # without its newline: the error's column counts along the line
                    obj = json.loads(line.rstrip("\n"))
                except json.JSONDecodeError as error:
                    raise DataError(
                        f"{path} row {number}: not valid JSON ({error.msg} at column {error.colno})"
                    ) from None
                if not isinstance(obj, dict):
                    raise DataError(
                        f"{path} row {number}: expected a JSON object, got {type(obj).__name__}"
                    )
                yield number, obj
        except UnicodeDecodeError:
            raise _not_utf8(path) from None

    columns = sorted({key for _, obj in objects() for key in obj})
    return columns, objects()


def _parquet_rows(path: Path) -> Rows:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: cannot read as Parquet ({error})") from None

    def rows() -> Iterator[tuple[int, dict]]:
        number = 0
        try:
            for batch in table.iter_batches(batch_size=PARQUET_BATCH):
                for row in batch.to_pylist():
                    number += 1
                    yield number, row
        except Exception as error:  # a damaged row group shows only when it is read
            raise DataError(f"{path}: cannot read as Parquet ({error})") from None

    return list(table.schema_arrow.names), rows()


def _is_blank(handle: BinaryIO) -> bool:
    """True if the file holds nothing but whitespace; leaves it at its start."""
    blank = all(not chunk.strip() for chunk in iter(lambda: handle.read(1 << 16), b""))
    handle.seek(0)
    return blank


@contextmanager
def _read_rows(path: Path) -> Iterator[Rows]:
    """A file's columns and rows, read as they are used: a large site's file is never in memory
    whole."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type '{suffix}'; use one of {list(SUPPORTED_SUFFIXES)}"
        )
    if path.is_dir():
        raise DataError(
            f"{path}: is a directory; give the records file itself (one of "
            f"{list(SUPPORTED_SUFFIXES)})"
        )
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if suffix == ".parquet":
        yield _parquet_rows(path)
        return
    try:
        handle = path.open("rb")
    except OSError as error:
        raise DataError(f"{path}: cannot read file ({error.strerror})") from None
    with handle:
        if _is_blank(handle):
            raise DataError(f"{path}: file is empty")
        yield _csv_rows(path, handle) if suffix == ".csv" else _jsonl_rows(path, handle)


def read_records(path: str | Path, config: DataConfig) -> list[Record]:
    """Every record of one file, with labels mapped to the federation's label list."""
    path = Path(path)
    with _read_rows(path) as table:
        return _checked_records(path, table, config)


def _checked_records(path: Path, table: Rows, config: DataConfig) -> list[Record]:
    """Each row as a Record, or the first problem as a DataError naming its row."""
    columns, rows = table
    for role, column in (("text", config.text_column), ("label", config.label_column)):
        if column not in columns:
            raise DataError(
                f"{path}: missing {role} column '{column}' (columns found: {columns}); name the "
                f"right one with --{role}-column (or {role}-column in the run or node config)"
            )
    label_index = {label: i for i, label in enumerate(config.labels)}
    records: list[Record] = []
    for number, row in rows:
        text = row.get(config.text_column)
        label = row.get(config.label_column)
        if text is None or not str(text).strip():
            raise DataError(f"{path} row {number}: text in column '{config.text_column}' is empty")
        if not isinstance(text, str):
            raise DataError(
                f"{path} row {number}: text in column '{config.text_column}' is a "
                f"{type(text).__name__}, not a string"
            )
        label_text = "" if label is None else _label_to_str(label)
        if label_text not in label_index:
            raise DataError(
                f"{path} row {number}: label '{label_text}' is not in the federation's label list "
                f"{list(config.labels)}"
            )
        records.append(Record(text=str(text), label=label_index[label_text]))
    if not records:
        raise DataError(f"{path}: has a header but no records")
    return records


def read_texts(path: str | Path, text_column: str) -> list[str]:
    """Just the texts of a file, for prediction: no label column needed."""
    path = Path(path)
    with _read_rows(path) as (columns, rows):
        if text_column not in columns:
            raise DataError(
                f"{path}: missing text column '{text_column}' (columns found: {columns})"
            )
        texts = []
        for number, row in rows:
            text = row.get(text_column)
            if text is None or not str(text).strip():
                raise DataError(f"{path} row {number}: text in column '{text_column}' is empty")
            texts.append(str(text))
    if not texts:
        raise DataError(f"{path}: has a header but no records")
    return texts


def _label_to_str(label: object) -> str:
    """Labels compare as text: 3, 3.0 and '3' from CSV, JSON or Parquet all mean label '3'."""
    if isinstance(label, float) and label.is_integer():
        return str(int(label))
    return str(label).strip()


def train_test_split(
    records: Sequence[Record], test_fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Deterministic split by seed; records with identical text always land on the same side.

    Grouping by text keeps a duplicated note (or an abstract listed once per label) from leaking
    from the test split into training.
    """
    groups: dict[str, list[Record]] = {}
    for record in records:
        key = hashlib.sha1(record.text.encode()).hexdigest()
        groups.setdefault(key, []).append(record)
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    target = max(1, round(test_fraction * len(records)))
    train: list[Record] = []
    test: list[Record] = []
    for position in order:
        group = groups[keys[position]]
        (test if len(test) < target else train).extend(group)
    if not train or not test:
        raise DataError(
            f"cannot split {len(records)} records into non-empty train and test sets "
            f"(test_fraction={test_fraction}); a hospital needs more records"
        )
    return train, test


class TokenizedRecords(Dataset):
    """Records tokenized once, truncated to max_length, kept unpadded until batching.

    All token ids sit in one flat array (uint16 when the vocabulary fits, else int32) with offsets:
    record i is ids[offsets[i]:offsets[i + 1]]. A tensor per record, built from the tokenizer's
    output for every record at once, left 46 KiB a record in the process at 128 tokens
    (docs/benchmarks.md, "Memory at a large site"); the tokenizer now sees TOKENIZE_CHUNK records
    at a time.
    """

    def __init__(
        self, records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, max_length: int
    ) -> None:
        self.ids = np.empty(
            len(records) * max_length, dtype=np.uint16 if len(tokenizer) <= 1 << 16 else np.int32
        )
        self.offsets = np.zeros(len(records) + 1, dtype=np.int64)
        filled = 0
        for start in range(0, len(records), TOKENIZE_CHUNK):
            chunk = records[start : start + TOKENIZE_CHUNK]
            encoded = tokenizer(
                [r.text for r in chunk],
                truncation=True,
                max_length=max_length,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
            for row, ids in enumerate(encoded, start=start):
                self.ids[filled : filled + len(ids)] = ids
                filled += len(ids)
                self.offsets[row + 1] = filled
        # the unused tail of the max-length sized buffer is given back
        self.ids = self.ids[:filled].copy()
        self.labels = torch.tensor([r.label for r in records], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.ids_of(index).astype(np.int64)), self.labels[index]

    def ids_of(self, index: int) -> np.ndarray:
        """Record `index`'s token ids, a view into the flat array."""
        return self.ids[self.offsets[index] : self.offsets[index + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class PadToLongest:
    """Collate: pad a batch to its own longest record, not to max_length.

    Works for token ids (padded with the pad token) and for cached hidden states (padded with
    zeros); the attention mask marks the real positions either way.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        first = batch[0][0]
        longest = max(inputs.shape[0] for inputs, _ in batch)
        fill = self.pad_token_id if first.dtype == torch.long else 0
        padded = torch.full((len(batch), longest, *first.shape[1:]), fill, dtype=first.dtype)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, (inputs, _) in enumerate(batch):
            padded[row, : inputs.shape[0]] = inputs
            attention_mask[row, : inputs.shape[0]] = 1
        labels = torch.stack([label for _, label in batch])
        return {"inputs": padded, "attention_mask": attention_mask, "labels": labels}


def warn_if_thin(who: str, train_labels: Sequence[int]) -> None:
    """Warn about training data that trains but probably not as meant: one record, or one label
    only."""
    if len(train_labels) == 1 or len(set(train_labels)) == 1:
        log.warning(
            "%s trains on %d record(s) of %d label(s): its model will learn little beyond that",
            who,
            len(train_labels),
            len(set(train_labels)),
        )
