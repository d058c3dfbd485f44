"""Bad data at a site: the real ClientApp on per-hospital files fails that hospital each round with
a fixed category, keeps the details in the site's own log, and the others finish
(tests/federation_harness.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from federation_harness import (
    federate,
    hospitals_of,
    ledger_path,
    real_grid,
    run_config,
    site_files,
    task_identity,  # noqa: F401 - the autouse fixture, for every test here
)
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from medtune.federation.wire import ARRAYS, FAILED, HOSPITAL, to_record


def test_a_hospital_with_a_bad_data_file_fails_each_round_while_the_others_finish(
    tiny_backbone_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = site_files(tmp_path)
    with files[2].open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    rows[5][1] = "cardio"  # row 5: a label the federation does not have
    with files[2].open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    config = run_config(tiny_backbone_dir, tmp_path / "run", hospitals=3, rounds=2)
    results = federate(real_grid(files, tmp_path, config), config)

    for server_round in (1, 2):
        seen = hospitals_of(results, server_round)
        assert seen["hospital_3"]["status"] == FAILED
        # Not even the row leaves: with the label list its choice, the coordinator could read each
        # record's value.
        assert (
            seen["hospital_3"]["reason"]
            == "records file refused; the details are in the site's own log"
        )
        assert [seen[f"hospital_{i}"]["status"] for i in (1, 2)] == ["trained", "trained"]
        assert seen["hospital_1"]["accuracy"] is not None and seen["hospital_3"]["accuracy"] is None
        assert results["rounds"][server_round - 1]["aggregated"] is True
        assert f"round {server_round}: hospital_3 failed: records file refused;" in " ".join(
            results["events"]
        )
    # The full message stays at the site: its log names file, row and value; the coordinator saw
    # none of it.
    assert f"{files[2]} row 5: label 'cardio' is not in the federation's label list" in caplog.text
    assert "cardio" not in json.dumps(results) and str(files[2]) not in json.dumps(results)
    # nothing was trained on the bad file, nothing spent
    assert not ledger_path(tmp_path, 3).exists()
    assert (
        json.loads(ledger_path(tmp_path, 1).read_text())["steps"]
        == hospitals_of(results, 2)["hospital_1"]["steps"]
    )


def test_an_unforeseen_error_at_a_site_leaves_it_as_a_category_only(
    tiny_backbone_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ledger folder the site cannot create (its parent is a file) raises an OSError MedTune does
    not name."""
    files = site_files(tmp_path)
    config = run_config(tiny_backbone_dir, tmp_path / "run", hospitals=3, rounds=1)
    grid = real_grid(files, tmp_path, config)
    blocker = tmp_path / "site-3-disk"
    blocker.write_text("a file where the site's ledger folder should be")
    grid.nodes[3].context.node_config["ledger-path"] = str(blocker / "ledger.json")
    results = federate(grid, config)
    seen = hospitals_of(results, 1)["hospital_3"]
    assert (seen["status"], seen["reason"]) == (
        FAILED,
        "site error; the details are in the site's own log",
    )
    stored = json.dumps(results)
    # no site path, no exception text at the coordinator
    assert str(blocker) not in stored and "Error" not in stored
    # the site's log
    assert "hospital_3 cannot take part: unexpected" in caplog.text and str(blocker) in caplog.text


def _missing_column(path: Path) -> None:
    path.write_text(
        path.read_text(encoding="utf-8").replace("text,label", "note,label", 1), encoding="utf-8"
    )


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _not_utf8(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:30] + b"\xff" + raw[31:])


def _empty_texts(path: Path) -> None:
    path.write_text("text,label\n," + "cardiology\n" + ",neurology\n", encoding="utf-8")


BAD_FILES = {
    "missing column": (_missing_column, ": missing text column 'text'"),
    "empty file": (_empty, ": file is empty"),
    "non-UTF-8": (_not_utf8, "line 2: not valid UTF-8 (byte 0xff at offset 30)"),
    "empty texts": (_empty_texts, "row 1: text in column 'text' is empty"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_each_data_error_becomes_a_failed_reply_naming_the_problem(
    case: str, tiny_backbone_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spoil, problem = BAD_FILES[case]
    path = site_files(tmp_path)[0]
    spoil(path)
    config = run_config(tiny_backbone_dir, tmp_path / "run", hospitals=1, **{"min-hospitals": 1})
    hospital = real_grid([path], tmp_path, config).nodes[1]
    for message_type in (MessageType.TRAIN, MessageType.EVALUATE):
        content = RecordDict({ARRAYS: to_record({}), "config": ConfigRecord({"server-round": 1})})
        reply = hospital(Message(content, dst_node_id=1, message_type=message_type))
        info = reply.content[HOSPITAL]
        assert (info["name"], info["status"]) == ("hospital_1", FAILED)
        assert info["reason"].startswith("records file refused") and str(path) not in info["reason"]
        assert str(path) in caplog.text and problem in caplog.text  # the site's own log has it all
        assert not reply.content.array_records and not reply.content.metric_records
    assert not ledger_path(tmp_path, 1).exists()
