"""Reading a hospital's records: every bad input gets its own message naming file, row and
problem."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import medtune.data as data_module
from medtune.config import DataConfig
from medtune.data import PadToLongest, Record, TokenizedRecords, read_records, train_test_split
from medtune.errors import DataError

CONFIG = DataConfig(labels=("cardiology", "neurology"))


def _csv(tmp_path: Path, body: str, name: str = "notes.csv") -> Path:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    return path


def test_reads_csv_jsonl_and_parquet_with_configured_columns(tmp_path):
    config = DataConfig(labels=("1", "2"), text_column="note", label_column="dx")
    csv_path = _csv(tmp_path, 'note,dx\n"CP, radiating",1\nfacial droop,2\n')
    jsonl_path = tmp_path / "notes.jsonl"
    jsonl_path.write_text(
        json.dumps({"note": "CP", "dx": 1})
        + "\n\n"
        + json.dumps({"note": "droop", "dx": "2"})
        + "\n"
    )
    parquet_path = tmp_path / "notes.parquet"
    pq.write_table(pa.table({"note": ["CP", "droop"], "dx": [1, 2]}), parquet_path)
    assert read_records(csv_path, config) == [Record("CP, radiating", 0), Record("facial droop", 1)]
    assert read_records(jsonl_path, config) == [Record("CP", 0), Record("droop", 1)]
    assert read_records(parquet_path, config) == [Record("CP", 0), Record("droop", 1)]


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "text,label\nchest pain,cardiology\nheadache,cardio\n",
            "notes.csv row 2: label 'cardio' is not in the federation's label list ['cardiology', "
            "'neurology']",
        ),
        (
            "note,label\nchest pain,cardiology\n",
            "notes.csv: missing text column 'text' (columns found: ['note', 'label'])",
        ),
        ("text,diagnosis\nchest pain,cardiology\n", "notes.csv: missing label column 'label'"),
        ("", "notes.csv: file is empty"),
        ("text,label\n", "notes.csv: has a header but no records"),
        (
            "text,label\nchest pain,cardiology\n  ,neurology\n",
            "notes.csv row 2: text in column 'text' is empty",
        ),
        (
            "text,label\nchest pain,cardiology,extra\n",
            "notes.csv row 1: has more fields than the header's 2",
        ),
    ],
)
def test_each_bad_csv_gets_its_specific_error(tmp_path, body, message):
    path = _csv(tmp_path, body)
    with pytest.raises(DataError) as error:
        read_records(path, CONFIG)
    assert message in str(error.value)


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_bytes(b"text,label\nchest pain,cardiology\ncaf\xe9 au lait spots,neurology\n")
    with pytest.raises(DataError, match=r"notes.csv line 3: not valid UTF-8 \(byte 0xe9"):
        read_records(path, CONFIG)


def test_files_are_read_as_a_stream_yet_name_the_row_or_line_far_into_them(tmp_path, monkeypatch):
    """Decoding and Parquet batches see a part of the file at a time; errors still count from its
    start."""
    lines = [b"\xef\xbb\xbftext,label\r\n"] + [b"chest pain,cardiology\r\n"] * 20_000
    lines[15_000] = b"caf\xe9 au lait spots,neurology\r\n"
    path = tmp_path / "notes.csv"
    path.write_bytes(b"".join(lines))
    offset = sum(len(line) for line in lines[:15_000]) + 3
    with pytest.raises(
        DataError, match=rf"notes.csv line 15001: not valid UTF-8 \(byte 0xe9 at offset {offset}\)"
    ):
        read_records(path, CONFIG)
    monkeypatch.setattr(data_module, "PARQUET_BATCH", 100)
    texts = ["chest pain"] * 999 + [" "]
    pq.write_table(
        pa.table({"text": texts, "label": ["cardiology"] * 1000}),
        tmp_path / "notes.parquet",
        row_group_size=300,
    )
    with pytest.raises(DataError, match="notes.parquet row 1000: text in column 'text' is empty"):
        read_records(tmp_path / "notes.parquet", CONFIG)


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(DataError, match="missing.csv: file not found"):
        read_records(tmp_path / "missing.csv", CONFIG)
    with pytest.raises(DataError, match="notes.txt: unsupported file type '.txt'"):
        read_records(_csv(tmp_path, "x", name="notes.txt"), CONFIG)
    broken = tmp_path / "notes.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="notes.parquet: cannot read as Parquet"):
        read_records(broken, CONFIG)
    bad_json = tmp_path / "notes.jsonl"
    bad_json.write_text('{"text": "CP", "label": "cardiology"}\n{"text": "HA", \n')
    with pytest.raises(DataError, match="notes.jsonl row 2: not valid JSON"):
        read_records(bad_json, CONFIG)


def test_split_is_deterministic_and_keeps_duplicate_texts_together():
    records = [Record(f"note {i}", i % 2) for i in range(50)] + [
        Record("note 7", 1),
        Record("note 8", 0),
    ]
    train_a, test_a = train_test_split(records, 0.2, seed=3)
    train_b, test_b = train_test_split(records, 0.2, seed=3)
    assert (train_a, test_a) == (train_b, test_b)
    assert train_test_split(records, 0.2, seed=4)[1] != test_a
    assert len(test_a) in (10, 11, 12) and len(train_a) + len(test_a) == len(records)
    train_texts, test_texts = {r.text for r in train_a}, {r.text for r in test_a}
    assert not train_texts & test_texts


def test_batches_pad_to_the_longest_text_and_truncate_to_max_length(tiny_backbone):
    tokenizer = tiny_backbone.tokenizer
    records = [
        Record("short", 0),
        Record("a somewhat longer clinical note", 1),
        Record("word " * 200, 0),
    ]
    dataset = TokenizedRecords(records, tokenizer, max_length=16)
    assert len(dataset[2][0]) == 16
    batch = PadToLongest(tokenizer.pad_token_id)([dataset[0], dataset[1]])
    longest = len(dataset[1][0])
    assert batch["inputs"].shape == (2, longest) and longest < 16
    assert batch["attention_mask"][0].sum() == len(dataset[0][0])
    assert batch["inputs"][0, -1] == tokenizer.pad_token_id


def test_token_ids_are_held_in_one_flat_array_of_two_byte_ids(tiny_backbone, monkeypatch):
    """A site of a million records keeps its token ids in memory: 2 bytes a token, not an object
    per record or id."""
    # several tokenizer calls, records crossing their edges
    monkeypatch.setattr(data_module, "TOKENIZE_CHUNK", 7)
    tokenizer = tiny_backbone.tokenizer
    records = [Record("chest pain " * n, n % 2) for n in range(1, 30)]
    dataset = TokenizedRecords(records, tokenizer, max_length=16)
    one_by_one = [tokenizer(r.text, truncation=True, max_length=16)["input_ids"] for r in records]
    # owns just its tokens, no max-length buffer
    assert dataset.ids.dtype == np.uint16 and dataset.ids.base is None
    assert dataset.ids.nbytes == 2 * sum(len(ids) for ids in one_by_one)
    assert [dataset[i][0].tolist() for i in range(len(records))] == one_by_one
    assert dataset[0][0].dtype == torch.long and [int(dataset[i][1]) for i in range(29)] == [
        r.label for r in records
    ]


class _LargeVocabulary:
    """A tokenizer whose ids pass 65,535, as a multilingual vocabulary's do."""

    def __len__(self) -> int:
        return 250_002

    def __call__(self, texts: list[str], **_: object) -> dict[str, list[list[int]]]:
        return {"input_ids": [[0, 70_000 + len(text), 2] for text in texts]}


def test_ids_past_two_bytes_are_kept_whole():
    dataset = TokenizedRecords([Record("a", 0), Record("abc", 1)], _LargeVocabulary(), max_length=8)
    assert dataset.ids.dtype == np.int32
    assert dataset[1][0].tolist() == [0, 70_003, 2]


def test_a_note_longer_than_pythons_csv_field_limit_is_read(tmp_path):
    """Python's csv refuses fields over 128 KiB by default; a long discharge summary is a record,
    not an error."""
    long_note = "patient stable on ward. " * 8000  # about 190 KiB
    path = tmp_path / "notes.csv"
    path.write_text(
        f'text,label\n"{long_note}",cardiology\nchest pain,cardiology\n', encoding="utf-8"
    )
    records = read_records(path, CONFIG)
    assert [len(record.text) for record in records] == [len(long_note), len("chest pain")]
