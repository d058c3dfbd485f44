"""Hostile replies, bad data at a site, corrupted ledgers and checkpoints: the federation refuses
what is wrong, says where, and goes on with the others.

server/federation.py is driven in-process through a fake Grid whose nodes are functions from a
Flower Message to a reply: either crafted replies (fast, exact) or the real ClientApp handlers on
real per-hospital files and ledgers. The real Simulation Engine is exercised in test_federation.py.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file

import client.app as client_app
from medtune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from medtune.errors import CheckpointError, ConfigError, FederationError, LedgerError
from medtune.metrics import from_counts
from medtune.federation.results import RunResults
from medtune.run_config import resolve_run_config, settings_from_run_config
from medtune.synth import LABELS, SynthConfig, write_hospitals
from medtune.federation.wire import (
    ARRAYS, FAILED, HOSPITAL, METRICS, REJECTED, evaluate_reply, from_record, ready_reply, to_record,
)
from medtune.site import Instruction
from server.federation import Federation, checkpoint_dir
from conftest import tiny_recipe

Node = Callable[[Message], Message]
Arrays = dict[str, np.ndarray]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps every Message with the running task's identity; the runtimes set it, here we do."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


class FakeGrid:
    """The two Grid calls the round loop makes, answered in-process by one function per node."""

    def __init__(self, nodes: dict[int, Node]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # Flower's grids stamp ids on sending
            delivered = copy.deepcopy(message)  # each node gets its own copy, as after serialisation
            reply = self.nodes[message.metadata.dst_node_id](delivered)
            if reply is not None:  # None: the node never answers
                replies.append(reply)
        return replies


def run_config(backbone: Path, out: Path, hospitals: int, **extra: Any) -> dict[str, Any]:
    return resolve_run_config(
        None,
        {
            **tiny_recipe(backbone),
            "hospitals": hospitals,
            "rounds": 1,
            "round-timeout": 5.0,
            "out": str(out),
            **extra,
        },
    )


def federate(grid: FakeGrid, config: dict[str, Any]) -> dict[str, Any]:
    Federation(grid, settings_from_run_config(config)).run()  # type: ignore[arg-type]
    return json.loads((Path(config["out"]) / "results.json").read_text())


def hospitals_of(results: dict[str, Any], server_round: int) -> dict[str, dict[str, Any]]:
    return {h["name"]: h for h in results["rounds"][server_round - 1]["hospitals"]}


# --- crafted replies ----------------------------------------------------------------------------

Tamper = Callable[[Arrays, dict[str, Any]], None]


def honest(arrays: Arrays, metrics: dict[str, Any]) -> None:
    """Leave the reply as an honest hospital sends it."""


class CraftedHospital:
    """Replies with the global state plus a small seeded step, or a tampered version of it."""

    def __init__(self, name: str, examples: int, tamper: Tamper = honest, step: float = 0.01) -> None:
        self.name, self.examples, self.tamper, self.step = name, examples, tamper, step
        self.sent: dict[int, Arrays] = {}  # round -> the arrays this hospital sent

    def __call__(self, message: Message) -> Message:
        if message.metadata.message_type == MessageType.QUERY:
            return Message(ready_reply(self.name, ready=True), reply_to=message)
        if message.metadata.message_type == MessageType.EVALUATE:
            evaluation = from_counts(LABELS, [2] * 5, [2] * 5, [1] * 5, loss=1.0)
            return Message(evaluate_reply(evaluation, self.name), reply_to=message)
        server_round = int(message.content["config"]["server-round"])
        rng = np.random.default_rng([int(self.name[-1]), server_round])
        arrays = {
            k: (v + self.step * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in from_record(message.content[ARRAYS]).items()
        }
        steps = 3 * server_round  # a real ledger grows by every round's steps
        metrics: dict[str, Any] = {"num-examples": self.examples, "epsilon": 1.0, "delta": 1e-5, "steps": steps}
        self.tamper(arrays, metrics)
        self.sent[server_round] = arrays
        content = RecordDict(
            {
                ARRAYS: to_record(arrays),
                METRICS: MetricRecord(metrics),
                HOSPITAL: ConfigRecord({"name": self.name, "status": "trained", "reason": ""}),
            }
        )
        return Message(content, reply_to=message)


def _rename(arrays: Arrays, metrics: dict[str, Any]) -> None:
    arrays["head.bias_"] = arrays.pop("head.bias")


def _extra_array(arrays: Arrays, metrics: dict[str, Any]) -> None:
    arrays["embeddings.word_embeddings.weight"] = np.zeros((8, 32), np.float32)


def _shape(arrays: Arrays, metrics: dict[str, Any]) -> None:
    arrays["prompt"] = arrays["prompt"][:-1]


def _dtype(arrays: Arrays, metrics: dict[str, Any]) -> None:
    arrays["head.weight"] = arrays["head.weight"].astype(np.float64)


def _nan(arrays: Arrays, metrics: dict[str, Any]) -> None:
    arrays["prompt"][0, 0] = np.nan


def _inf(arrays: Arrays, metrics: dict[str, Any]) -> None:
    arrays["head.weight"][1, 2] = np.inf


def _huge(arrays: Arrays, metrics: dict[str, Any]) -> None:
    arrays["prompt"] += np.float32(1e3)


def _examples(value: Any) -> Tamper:
    def tamper(arrays: Arrays, metrics: dict[str, Any]) -> None:
        metrics["num-examples"] = value

    return tamper


def _extra_metric(arrays: Arrays, metrics: dict[str, Any]) -> None:
    metrics["per-record-loss"] = [0.1, 0.2]


HOSTILE = {
    "wrong name": (_rename, "missing ['head.bias'], unexpected ['head.bias_']"),
    "extra array": (_extra_array, "unexpected ['embeddings.word_embeddings.weight']"),
    "wrong shape": (_shape, "'prompt' has shape (3, 32), expected (4, 32)"),
    "wrong dtype": (_dtype, "'head.weight' has dtype float64, expected float32"),
    "NaN": (_nan, "'prompt' contains NaN or infinite values"),
    "Inf": (_inf, "'head.weight' contains NaN or infinite values"),
    "huge norm": (_huge, "more than max-update-norm=100"),
    "negative example count": (_examples(-5), "claims -5 training examples"),
    "zero example count": (_examples(0), "claims 0 training examples"),
    "implausible example count": (_examples(10**9), "claims 1000000000 training examples"),
    "fractional example count": (_examples(12.5), "num-examples must be a whole number, got 12.5"),
    "extra metric": (_extra_metric, "metrics must be exactly"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_reply_is_rejected_and_the_others_are_aggregated(
    case: str, tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    tamper, reason = HOSTILE[case]
    good = {1: CraftedHospital("hospital_1", 100), 2: CraftedHospital("hospital_2", 300)}
    grid = FakeGrid({**good, 3: CraftedHospital("hospital_3", 200, tamper)})
    results = federate(grid, run_config(tiny_backbone_dir, tmp_path, hospitals=3))

    seen = hospitals_of(results, 1)
    assert seen["hospital_3"]["status"] == "rejected"
    assert "update from hospital_3" in seen["hospital_3"]["reason"] and reason in seen["hospital_3"]["reason"]
    assert any(e.startswith("round 1: rejected the update from hospital_3") for e in results["events"])
    assert [seen[f"hospital_{i}"]["status"] for i in (1, 2)] == ["trained", "trained"]
    assert results["rounds"][0]["aggregated"] is True
    aggregate = load_checkpoint(checkpoint_dir(tmp_path, 1)).arrays
    for name, array in aggregate.items():  # the example-weighted mean of the two honest updates alone
        expected = 0.25 * good[1].sent[1][name] + 0.75 * good[2].sent[1][name]
        np.testing.assert_allclose(array, expected, rtol=1e-6, atol=1e-7)


def test_a_reply_with_a_path_for_a_name_is_rejected(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    nodes = {1: CraftedHospital("hospital_1", 100), 2: CraftedHospital("hospital_2", 100)}
    nodes[3] = CraftedHospital("../../hospital_3", 100)  # would be kept as out/updates/round_001/../../hospital_3
    config = run_config(tiny_backbone_dir, tmp_path / "run", hospitals=3, **{"keep-updates": True})
    results = federate(FakeGrid(nodes), config)
    assert "not a valid hospital name" in hospitals_of(results, 1)["../../hospital_3"]["reason"]
    assert sorted(p.name for p in (tmp_path / "run" / "updates" / "round_001").iterdir()) == [
        "_sent.safetensors",  # the global state the round sent
        "hospital_1.safetensors",
        "hospital_2.safetensors",
    ]
    assert not (tmp_path / "run" / "hospital_3.safetensors").exists()


class DiesAfterRound1(CraftedHospital):
    """Answers round 1, then dies: its node either yields the SuperLink's error reply or falls silent."""

    def __init__(self, name: str, examples: int, silent: bool) -> None:
        super().__init__(name, examples)
        self.silent = silent

    def __call__(self, message: Message) -> Message | None:
        if int(message.content["config"]["server-round"]) == 1:
            return super().__call__(message)
        if self.silent:
            return None
        reply = Message(Error(code=0, reason="the SuperNode stopped"), reply_to=message)
        reply.metadata.__dict__["_src_node_id"] = 1  # as in deployment: the SuperLink answers for a dead node
        return reply


def test_a_node_that_dies_is_named_by_its_hospital(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    nodes = {
        11: CraftedHospital("hospital_1", 100),
        12: DiesAfterRound1("hospital_2", 100, silent=False),
        13: DiesAfterRound1("hospital_3", 100, silent=True),
    }
    results = federate(FakeGrid(nodes), run_config(tiny_backbone_dir, tmp_path, hospitals=3, rounds=2, **{"min-hospitals": 1}))
    second = hospitals_of(results, 2)
    assert second["hospital_2"]["status"] == FAILED and second["hospital_2"]["reason"] == "the SuperNode stopped"
    assert second["hospital_3"]["status"] == FAILED and second["hospital_3"]["reason"] == "no reply to the readiness query"
    assert "node 1" not in second
    assert "round 2: hospital_2 failed: the SuperNode stopped" in results["events"]
    assert "round 2: no readiness reply within 5.0 s from hospital_3" in results["events"]
    assert results["rounds"][1]["aggregated"]  # hospital_1 alone meets min-hospitals=1


def _nan_from_round_2(arrays: Arrays, metrics: dict[str, Any]) -> None:
    if metrics["steps"] > 3:
        _nan(arrays, metrics)


def test_too_few_valid_updates_skip_the_round_and_keep_the_global_state(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    hostile = CraftedHospital("hospital_2", 100, _nan_from_round_2)
    grid = FakeGrid({1: CraftedHospital("hospital_1", 100), 2: hostile, 3: CraftedHospital("hospital_3", 100, _huge)})
    config = run_config(tiny_backbone_dir, tmp_path, hospitals=3, rounds=2)
    results = federate(grid, config)

    assert [r["aggregated"] for r in results["rounds"]] == [True, False]  # min-hospitals = 2, one valid update in round 2
    assert "round 2: 1 valid update(s), fewer than min-hospitals=2; round skipped, the global state is kept" in results["events"]
    after_round_1 = load_checkpoint(checkpoint_dir(tmp_path, 1)).arrays
    kept = load_checkpoint(checkpoint_dir(tmp_path, 2)).arrays  # the run went on, and the global state stayed
    for name, array in after_round_1.items():
        np.testing.assert_array_equal(kept[name], array)
    assert hospitals_of(results, 2)["hospital_1"]["status"] == "trained"


def test_a_federation_in_which_no_hospital_ever_trains_fails_and_leaves_no_checkpoint(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    grid = FakeGrid({i: CraftedHospital(f"hospital_{i}", 100, _nan) for i in (1, 2, 3)})
    config = run_config(tiny_backbone_dir, tmp_path, hospitals=3, rounds=2)
    with pytest.raises(FederationError, match="no hospital trained in any round"):
        federate(grid, config)
    assert not (tmp_path / "checkpoints").exists()  # nothing that `medtune predict` would serve
    recorded = json.loads((tmp_path / "results.json").read_text())
    assert [r["aggregated"] for r in recorded["rounds"]] == [False, False]
    assert all(h["status"] == REJECTED for r in recorded["rounds"] for h in r["hospitals"])


def test_a_federation_error_ends_the_server_app_as_failed_with_one_line_and_no_traceback(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    """As a SuperLink runs it: Flower calls the ServerApp, catches what it raises (the run is then
    finished:failed, exit code 201) and logs it; a MedTuneError is logged as one line."""
    import inspect
    import io
    import logging

    from flwr.server.run_serverapp import run as run_server_app
    from flwr.superlink.runtime import run_serverapp
    from flwr.supercore.logger import log as flower_log

    import server.app

    # The call in Flower's ServerApp runtime this test replays (a release that logs otherwise fails here).
    assert 'log(ERROR, "%s raised an exception", exc_entity, exc_info=ex)' in inspect.getsource(run_serverapp)
    grid = FakeGrid({i: CraftedHospital(f"hospital_{i}", 100, _nan) for i in (1, 2)})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config(tiny_backbone_dir, tmp_path, hospitals=2))
    shown = io.StringIO()
    handler = logging.StreamHandler(shown)  # formats as Flower's console does: a traceback, if any, follows
    logging.getLogger("flwr").addHandler(handler)
    try:
        with pytest.raises(FederationError) as raised:  # raised, so Flower marks the run as failed
            run_server_app(grid, context, server_app_dir="", loaded_server_app=server.app.app)  # type: ignore[arg-type]
        flower_log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=raised.value)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    assert shown.getvalue() == f"ServerApp raised an exception: {raised.value}\n"
    assert "no hospital trained in any round" in shown.getvalue() and "Traceback" not in shown.getvalue()


# --- robust aggregation ---------------------------------------------------------------------------


def _outlier(arrays: Arrays, metrics: dict[str, Any]) -> None:
    """Far from the others but within max-update-norm: the case robust aggregation is for."""
    for array in arrays.values():
        array += np.float32(2.0)


@pytest.mark.parametrize(("strategy", "combine"), [("fedmedian", np.median), ("trimmed-mean", None)])
def test_robust_strategies_aggregate_only_the_checked_updates_unweighted(
    strategy: str, combine: Any, tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    nodes = {i: CraftedHospital(f"hospital_{i}", 100 * i) for i in (1, 2, 3)}
    nodes[4] = CraftedHospital("hospital_4", 10**6, _outlier)  # also claims the most examples
    nodes[5] = CraftedHospital("hospital_5", 100, _nan)  # rejected before any strategy sees it
    config = run_config(
        tiny_backbone_dir, tmp_path, hospitals=5, strategy=strategy, **{"trim-fraction": 0.25, "keep-updates": True}
    )
    results = federate(FakeGrid(nodes), config)

    assert hospitals_of(results, 1)["hospital_5"]["status"] == "rejected"
    assert hospitals_of(results, 1)["hospital_4"]["update_norm"] > 30  # accepted: robustness is the strategy's job
    sent = [nodes[i].sent[1] for i in (1, 2, 3, 4)]
    aggregate = load_checkpoint(checkpoint_dir(tmp_path, 1)).arrays
    for name, array in aggregate.items():
        stacked = np.stack([s[name] for s in sent])
        if combine is None:  # cut one of four per tail, per coordinate; examples do not weigh
            expected = np.sort(stacked, axis=0)[1:3].mean(axis=0)
        else:
            expected = combine(stacked, axis=0)
        np.testing.assert_allclose(array, expected, rtol=1e-6, atol=1e-7)
        assert np.all(np.abs(array - np.stack([s[name] for s in sent[:3]]).mean(axis=0)) < 0.05)  # outlier ignored
    for i in (1, 2, 3, 4):  # the strategy consumed its own copies: what each hospital sent is kept intact
        kept = load_file(str(tmp_path / "updates" / "round_001" / f"hospital_{i}.safetensors"))
        for name, array in nodes[i].sent[1].items():
            np.testing.assert_array_equal(kept[name], array)


def test_trimmed_mean_says_when_it_cuts_nothing(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    nodes = {i: CraftedHospital(f"hospital_{i}", 100) for i in (1, 2, 3)}
    results = federate(FakeGrid(nodes), run_config(tiny_backbone_dir, tmp_path, hospitals=3, strategy="trimmed-mean"))
    assert any("trim-fraction 0.2 cuts nothing from 3 hospitals" in e for e in results["events"])


@pytest.mark.parametrize("strategy", ["fedmedian", "trimmed-mean", "fedadam"])
def test_resume_matches_an_uninterrupted_run(strategy: str, tiny_backbone_dir: Path, tmp_path: Path) -> None:
    def grid() -> FakeGrid:
        return FakeGrid({i: CraftedHospital(f"hospital_{i}", 100 * i, step=0.05) for i in (1, 2, 3)})

    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    common = {"rounds": 3, "strategy": strategy}
    federate(grid(), run_config(tiny_backbone_dir, interrupted, hospitals=3, **common, **{"until-round": 2}))
    federate(grid(), run_config(tiny_backbone_dir, interrupted, hospitals=3, **common, resume=str(interrupted)))
    federate(grid(), run_config(tiny_backbone_dir, straight, hospitals=3, **common))
    resumed = load_checkpoint(checkpoint_dir(interrupted, 3)).arrays
    for name, array in load_checkpoint(checkpoint_dir(straight, 3)).arrays.items():
        np.testing.assert_array_equal(resumed[name], array)


# --- real ClientApp on per-hospital files ---------------------------------------------------------


class RealHospital:
    """The real ClientApp handlers, as a deployed SuperNode runs them (its own file and ledger)."""

    def __init__(self, node_id: int, node_config: dict[str, str], config: dict[str, Any]) -> None:
        self.context = Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config=config)

    def __call__(self, message: Message) -> Message:
        return client_app.app(message, self.context)  # the ClientApp with its mods, as a SuperNode calls it


def site_files(tmp_path: Path) -> list[Path]:
    return write_hospitals(SynthConfig(hospitals=3, mean_records=60, seed=0), tmp_path / "data")


def real_grid(files: list[Path], tmp_path: Path, config: dict[str, Any]) -> FakeGrid:
    return FakeGrid(
        {
            i: RealHospital(
                i,
                {
                    "hospital": f"hospital_{i}", "data-path": str(path), "ledger-path": str(ledger_path(tmp_path, i)),
                    "text-column": "text", "label-column": "label",
                    "max-epsilon": config["epsilon"],  # each site's ceiling: what these runs ask for
                    "share-evaluation-counts": True,  # these sites consent to report their test counts
                },
                config,
            )
            for i, path in enumerate(files, start=1)
        }
    )


def ledger_path(tmp_path: Path, number: int) -> Path:
    return tmp_path / "sites" / f"hospital_{number}" / "ledger.json"


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
        # Not even the row leaves: with the label list its choice, the coordinator could read each record's value.
        assert seen["hospital_3"]["reason"] == "records file refused; the details are in the site's own log"
        assert [seen[f"hospital_{i}"]["status"] for i in (1, 2)] == ["trained", "trained"]
        assert seen["hospital_1"]["accuracy"] is not None and seen["hospital_3"]["accuracy"] is None
        assert results["rounds"][server_round - 1]["aggregated"] is True
        assert f"round {server_round}: hospital_3 failed: records file refused;" in " ".join(results["events"])
    # The full message stays at the site: its log names file, row and value; the coordinator saw none of it.
    assert f"{files[2]} row 5: label 'cardio' is not in the federation's label list" in caplog.text
    assert "cardio" not in json.dumps(results) and str(files[2]) not in json.dumps(results)
    assert not ledger_path(tmp_path, 3).exists()  # nothing was trained on the bad file, nothing spent
    assert json.loads(ledger_path(tmp_path, 1).read_text())["steps"] == hospitals_of(results, 2)["hospital_1"]["steps"]


def test_an_unforeseen_error_at_a_site_leaves_it_as_a_category_only(
    tiny_backbone_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ledger folder the site cannot create (its parent is a file) raises an OSError MedTune does not name."""
    files = site_files(tmp_path)
    config = run_config(tiny_backbone_dir, tmp_path / "run", hospitals=3, rounds=1)
    grid = real_grid(files, tmp_path, config)
    blocker = tmp_path / "site-3-disk"
    blocker.write_text("a file where the site's ledger folder should be")
    grid.nodes[3].context.node_config["ledger-path"] = str(blocker / "ledger.json")
    results = federate(grid, config)
    seen = hospitals_of(results, 1)["hospital_3"]
    assert (seen["status"], seen["reason"]) == (FAILED, "site error; the details are in the site's own log")
    stored = json.dumps(results)
    assert str(blocker) not in stored and "Error" not in stored  # no site path, no exception text at the coordinator
    assert "hospital_3 cannot take part: unexpected" in caplog.text and str(blocker) in caplog.text  # the site's log


def _missing_column(path: Path) -> None:
    path.write_text(path.read_text(encoding="utf-8").replace("text,label", "note,label", 1), encoding="utf-8")


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


def first_round_of(backbone: Path, tmp_path: Path, rounds: int) -> tuple[list[Path], dict[str, Any]]:
    """Three real hospitals train round 1 of `rounds` and stop; returns their files and the config that resumes."""
    files = site_files(tmp_path)
    config = run_config(backbone, tmp_path / "run", hospitals=3, rounds=rounds, **{"until-round": 1})
    federate(real_grid(files, tmp_path, config), config)
    return files, {**config, "until-round": 0, "resume": str(tmp_path / "run")}


def test_a_corrupted_ledger_makes_its_hospital_fail_never_restart_at_zero(
    tiny_backbone_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files, resume = first_round_of(tiny_backbone_dir, tmp_path, rounds=2)
    damaged = ledger_path(tmp_path, 2)
    garbled = damaged.read_bytes()[: len(damaged.read_bytes()) // 2]  # a torn write from an older tool
    damaged.write_bytes(garbled)

    results = federate(real_grid(files, tmp_path, resume), resume)
    seen = hospitals_of(results, 2)
    assert seen["hospital_2"]["status"] == FAILED
    assert seen["hospital_2"]["reason"] == "privacy ledger refused; the details are in the site's own log"
    assert f"{damaged}: unreadable privacy ledger" in caplog.text and "refusing to start a fresh one" in caplog.text
    assert damaged.read_bytes() == garbled  # left as found, for a person to inspect
    assert [seen[f"hospital_{i}"]["status"] for i in (1, 3)] == ["trained", "trained"]
    assert results["rounds"][1]["aggregated"] is True


def test_a_ledger_whose_history_was_cut_is_refused(tmp_path: Path) -> None:
    from medtune.config import PrivacyConfig, TrainConfig
    from medtune.ledger_file import load_or_create_ledger
    from medtune.privacy import PrivacyLedger, ledger_checksum

    privacy = PrivacyConfig(epsilon=8.0, accountant="rdp")
    ledger = PrivacyLedger(privacy, sample_rate=0.25, planned_steps=8)
    for _ in range(4):
        ledger.accountant.step(noise_multiplier=ledger.noise_multiplier, sample_rate=0.25)
    state = ledger.state_dict()
    state["history"] = []  # valid JSON, but the spending it recorded is gone
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps(state))
    with pytest.raises(LedgerError, match=f"{re.escape(str(path))}: damaged privacy ledger"):
        load_or_create_ledger(path, privacy, 40, TrainConfig(batch_size=10), rounds=2, hospital="h", records="r")
    path.write_text(json.dumps({**state, "checksum": ledger_checksum(state)}))  # an editor who fixed the checksum
    with pytest.raises(LedgerError, match=f"{re.escape(str(path))}: corrupted ledger .* adds up to 0 steps but it records 4"):
        load_or_create_ledger(path, privacy, 40, TrainConfig(batch_size=10), rounds=2, hospital="h", records="r")


# --- corrupted checkpoints ------------------------------------------------------------------------


@pytest.fixture
def interrupted_run(tiny_backbone_dir: Path, tmp_path: Path) -> dict[str, Any]:
    """A fedadam run stopped after round 1 (so it has strategy moments), and its resume config."""
    config = run_config(tiny_backbone_dir, tmp_path, hospitals=3, rounds=2, strategy="fedadam", **{"until-round": 1})
    federate(FakeGrid({i: CraftedHospital(f"hospital_{i}", 100) for i in (1, 2, 3)}), config)
    return {**config, "until-round": 0, "resume": str(tmp_path)}


@pytest.mark.parametrize("damaged", ["state.safetensors", "meta.json", "strategy.safetensors"])
def test_a_corrupted_checkpoint_stops_the_resume_naming_the_file(damaged: str, interrupted_run: dict[str, Any]) -> None:
    path = checkpoint_dir(Path(interrupted_run["out"]), 1) / damaged
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: corrupted"):
        Federation(FakeGrid({}), settings_from_run_config(interrupted_run))  # type: ignore[arg-type]


def test_an_interrupted_checkpoint_write_resumes_from_the_last_complete_round(interrupted_run: dict[str, Any]) -> None:
    out = Path(interrupted_run["out"])
    half_written = checkpoint_dir(out, 2)  # a crash after state.safetensors, before meta.json
    half_written.mkdir(parents=True)
    (half_written / "state.safetensors").write_bytes((checkpoint_dir(out, 1) / "state.safetensors").read_bytes())
    federation = Federation(FakeGrid({}), settings_from_run_config(interrupted_run))  # type: ignore[arg-type]
    assert federation.first_round == 2


def test_a_failed_write_leaves_the_previous_checkpoint_whole(
    interrupted_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = checkpoint_dir(Path(interrupted_run["out"]), 1)
    before = load_checkpoint(directory)

    def crash(descriptor: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    changed = {name: array + 1 for name, array in before.arrays.items()}
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(directory, Checkpoint(changed, before.labels, before.model, "x", "y", before.extra))
    monkeypatch.undo()
    after = load_checkpoint(directory)
    for name, array in before.arrays.items():
        np.testing.assert_array_equal(after.arrays[name], array)
    assert sorted(p.name for p in directory.iterdir()) == ["meta.json", "state.safetensors", "strategy.safetensors"]


def test_corrupted_results_stop_the_resume(interrupted_run: dict[str, Any]) -> None:
    path = Path(interrupted_run["out"]) / "results.json"
    path.write_text(path.read_text()[:50])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}: corrupted run results"):
        RunResults.load(Path(interrupted_run["out"]), up_to_round=1)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("trim-fraction", 0.5, "trim-fraction must be in \\[0, 0.5\\)"),
        ("max-update-norm", 0.0, "max-update-norm must be positive"),
        ("max-examples", 0, "max-examples must be at least 1"),
        ("strategy", "krum", "strategy must be one of"),
    ],
)
def test_robustness_settings_are_validated(key: str, value: Any, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_from_run_config(resolve_run_config(None, {key: value, "out": str(tmp_path)}))


# --- privacy never under-counted: locks, lost ledgers, repeated rounds -----------------------------


def test_a_deleted_ledger_makes_its_hospital_fail_never_start_afresh(
    tiny_backbone_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files, resume = first_round_of(tiny_backbone_dir, tmp_path, rounds=2)
    deleted = ledger_path(tmp_path, 1)
    deleted.unlink()

    results = federate(real_grid(files, tmp_path, resume), resume)
    seen = hospitals_of(results, 2)
    assert seen["hospital_1"]["status"] == FAILED and seen["hospital_1"]["reason"].startswith("privacy ledger refused")
    assert f"{deleted}: privacy ledger missing" in caplog.text
    assert not deleted.exists()  # no fresh ledger was started in its place
    assert [seen[f"hospital_{i}"]["status"] for i in (2, 3)] == ["trained", "trained"]


def _wipe(path: Path) -> None:
    """The site's folder wiped to free disk: the ledger and the optimizer state beside it are gone."""
    path.unlink()
    path.with_name("ledger.optimizer.safetensors").unlink()


def _restore_fresh(path: Path) -> None:
    """The ledger replaced by a backup taken before round 1: well-formed, with a valid checksum, and behind."""
    from medtune.privacy import ledger_checksum

    state = json.loads(path.read_text())
    fresh = {**state, "history": [], "steps": 0, "epsilon_spent": 0.0, "trained_rounds": []}
    path.write_text(json.dumps({**fresh, "checksum": ledger_checksum(fresh)}))


def _claim_more_noise(path: Path) -> None:
    """The past steps edited to claim noise multiplier 1000 (lower epsilon), checksum recomputed by the editor."""
    from medtune.privacy import ledger_checksum

    state = json.loads(path.read_text())
    edited = {**state, "history": [[1000.0, rate, steps] for _, rate, steps in state["history"]]}
    path.write_text(json.dumps({**edited, "checksum": ledger_checksum(edited)}))


@pytest.mark.parametrize(
    "tamper, logged",
    [
        (_wipe, "privacy ledger missing, but the coordinator records"),
        (_restore_fresh, "privacy ledger is behind: it records 0 steps, but the coordinator records"),
        (_claim_more_noise, "privacy ledger's history gives epsilon=0.0"),
    ],
)
def test_a_ledger_that_disagrees_with_the_coordinators_record_is_refused_before_any_step(
    tamper: Callable[[Path], None], logged: str, tiny_backbone_dir: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Wiped, rolled back or edited: the site refuses before training, naming the path; no step is taken."""
    files, resume = first_round_of(tiny_backbone_dir, tmp_path, rounds=3)
    tampered = ledger_path(tmp_path, 1)
    reported = hospitals_of(json.loads((tmp_path / "run" / "results.json").read_text()), 1)["hospital_1"]
    assert reported["steps"] > 0
    tamper(tampered)
    before = tampered.read_bytes() if tampered.exists() else None

    results = federate(real_grid(files, tmp_path, resume), resume)
    for server_round in (2, 3):
        seen = hospitals_of(results, server_round)
        assert seen["hospital_1"]["status"] == FAILED and seen["hospital_1"]["reason"].startswith("privacy ledger refused")
        assert [seen[f"hospital_{i}"]["status"] for i in (2, 3)] == ["trained", "trained"]
    assert f"{tampered}: {logged}" in caplog.text
    after = tampered.read_bytes() if tampered.exists() else None
    assert after == before  # no DP step was taken on it, and no fresh ledger was started in its place
    assert str(tmp_path) not in json.dumps(results["rounds"])  # the path stays in the site's log


def test_resuming_without_the_run_history_is_refused(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    files, resume = first_round_of(tiny_backbone_dir, tmp_path, rounds=3)
    (tmp_path / "run" / "results.json").unlink()
    with pytest.raises(CheckpointError, match="results.json: missing, so rounds 1..1 of this run have no record"):
        federate(real_grid(files, tmp_path, resume), resume)


def test_a_round_sent_again_gets_the_update_already_sent_at_no_cost(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    """A coordinator that stopped after its sites replied sends the same round again: the site resends, spending
    nothing; the same round from another global state trains afresh, counted, with fresh noise."""
    from medtune.label_prior import initial_model
    from client.node_config import _deployed_site

    files = site_files(tmp_path)
    config = run_config(tiny_backbone_dir, tmp_path / "run", hospitals=1, rounds=3, **{"min-hospitals": 1, "epsilon": 8.0})
    node = {
        "hospital": "hospital_1", "data-path": str(files[0]), "ledger-path": str(ledger_path(tmp_path, 1)), "max-epsilon": 8.0,
        "text-column": "text", "label-column": "label",
    }
    site = _deployed_site(settings_from_run_config(config), node)
    arrays = dict(initial_model(site.backbone, site.settings.model, site.settings.data, seed=0).exchanged_state())
    first = site.train_round(Instruction(arrays, server_round=1))
    steps = json.loads(ledger_path(tmp_path, 1).read_text())["steps"]
    again = site.train_round(Instruction(arrays, server_round=1))  # same round, same global state
    assert again.resent and not first.resent
    for name, array in first.arrays.items():
        np.testing.assert_array_equal(again.arrays[name], array)  # the same output: no new noise drawn
    assert json.loads(ledger_path(tmp_path, 1).read_text())["steps"] == steps == again.ledger.steps  # nothing spent

    moved = {name: array + np.float32(0.01) for name, array in arrays.items()}
    other = site.train_round(Instruction(moved, server_round=1))  # same round, another global state: trained
    assert other.trained and not other.resent
    assert not np.allclose(first.arrays["prompt"], other.arrays["prompt"])
    ledger = json.loads(ledger_path(tmp_path, 1).read_text())
    assert ledger["steps"] == 2 * steps  # every DP step taken is counted
    assert ledger["trained_rounds"] == [1, 1]
    assert ledger["events"] and ledger["events"][0].startswith(f"round 1 trained again from step {steps}")

    site.train_round(Instruction(other.arrays, server_round=2))
    assert site.sent_update.read().round == 2  # the next round's start replaced the kept update
    assert not site.train_round(Instruction(other.arrays, server_round=1)).resent  # round 1's answer is gone


def test_a_ledger_serves_one_hospital_and_one_process(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    from medtune.label_prior import initial_model
    from medtune.locks import LockedError, exclusive
    from client.node_config import _deployed_site

    files = site_files(tmp_path)
    settings = settings_from_run_config(run_config(tiny_backbone_dir, tmp_path / "run", hospitals=2, **{"min-hospitals": 1}))
    shared = ledger_path(tmp_path, 1)
    terms = {"max-epsilon": 8.0, "text-column": "text", "label-column": "label"}
    first = _deployed_site(settings, {"hospital": "hospital_1", "data-path": str(files[0]), "ledger-path": str(shared), **terms})
    arrays = dict(initial_model(first.backbone, settings.model, settings.data, seed=0).exchanged_state())
    trained = first.train_round(Instruction(arrays, server_round=1))
    steps = json.loads(shared.read_text())["steps"]
    assert steps == trained.ledger.steps and json.loads(shared.read_text())["hospital"] == "hospital_1"

    other = _deployed_site(settings, {"hospital": "hospital_2", "data-path": str(files[1]), "ledger-path": str(shared), **terms})
    with pytest.raises(LedgerError, match=f"{re.escape(str(shared))} is the privacy ledger of hospital 'hospital_1'"):
        other.train_round(Instruction(arrays, server_round=1))
    with exclusive(shared, "a ledger held by another SuperNode"):  # flock: another open file, as another process
        with pytest.raises(LockedError, match=f"{re.escape(str(shared))}: hospital_1's privacy ledger is in use by pid"):
            first.train_round(Instruction(arrays, server_round=2))
    assert json.loads(shared.read_text())["steps"] == steps  # neither refused attempt charged or lost a step


class StopsTheRunInRound2(CraftedHospital):
    """Ctrl-C arrives while round 2's replies are coming in."""

    def __call__(self, message: Message) -> Message:
        from medtune.stopping import STOP

        if int(message.content["config"].get("server-round", 0)) == 2:
            STOP.set()
        return super().__call__(message)


def test_a_stop_signal_records_nothing_of_the_interrupted_round(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    from medtune.stopping import STOP, Interrupted

    nodes = {1: CraftedHospital("hospital_1", 100), 2: StopsTheRunInRound2("hospital_2", 100)}
    config = run_config(tiny_backbone_dir, tmp_path, hospitals=2, rounds=3)
    try:
        with pytest.raises(Interrupted, match="stopped by a signal before this round was recorded"):
            federate(FakeGrid(nodes), config)
    finally:
        STOP.clear()
    recorded = json.loads((tmp_path / "results.json").read_text())
    assert [r["round"] for r in recorded["rounds"]] == [1]  # round 2 left no trace: --resume repeats it
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round_001"]


def test_resuming_with_other_settings_or_an_edited_round_names_what_differs(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    grid = FakeGrid({i: CraftedHospital(f"hospital_{i}", 100) for i in (1, 2)})
    config = run_config(tiny_backbone_dir, tmp_path, hospitals=2, rounds=3, **{"until-round": 1})
    federate(grid, config)
    resumed = {**config, "until-round": 0, "resume": str(tmp_path)}
    with pytest.raises(CheckpointError, match=r"other settings \({'learning-rate': \(0.05, 0.01\)}\)"):
        federate(grid, {**resumed, "learning-rate": 0.01})

    meta = checkpoint_dir(tmp_path, 1) / "meta.json"
    edited = json.loads(meta.read_text())
    edited["round"] = 99
    meta.write_text(json.dumps(edited))
    with pytest.raises(CheckpointError, match="says round 99, but the checkpoint is round_001 of a run of 3 rounds"):
        federate(grid, resumed)


# --- what a stop costs, who may spend, one name per node (issue 22, items 5, 8, 9) ------------------


class StopsAfterTraining(RealHospital):
    """Ctrl-C lands after this site trained round 2 and sent its update, before the coordinator recorded it."""

    def __call__(self, message: Message) -> Message:
        from medtune.stopping import STOP

        reply = super().__call__(message)
        if message.metadata.message_type == MessageType.TRAIN and int(message.content["config"]["server-round"]) == 2:
            STOP.set()
        return reply


def test_a_stop_after_the_sites_trained_costs_no_budget(
    tiny_backbone_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGINT in round 2 of 3 and --resume: all 3 rounds complete, and every ledger equals a straight run's."""
    from medtune.stopping import STOP, Interrupted

    caplog.set_level("INFO", logger="medtune.site")

    files = site_files(tmp_path)
    config = run_config(tiny_backbone_dir, tmp_path / "run", hospitals=3, rounds=3, epsilon=8.0)
    grid = real_grid(files, tmp_path, config)
    grid.nodes[3] = StopsAfterTraining(3, grid.nodes[3].context.node_config, config)
    try:
        with pytest.raises(Interrupted):
            federate(grid, config)
    finally:
        STOP.clear()
    resumed = federate(real_grid(files, tmp_path, config), {**config, "resume": str(tmp_path / "run")})
    straight_dir = tmp_path / "straight"
    straight_config = {**config, "out": str(straight_dir / "run")}
    federate(real_grid(files, straight_dir, straight_config), straight_config)

    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3] and all(r["aggregated"] for r in resumed["rounds"])
    assert "hospital_3: round 2 was trained from this global state before; its update is sent again" in caplog.text
    for i in (1, 2, 3):
        stopped, uninterrupted = (json.loads(ledger_path(base, i).read_text()) for base in (tmp_path, straight_dir))
        assert stopped["steps"] == uninterrupted["steps"] and stopped["trained_rounds"] == [1, 2, 3]
        assert stopped["epsilon_spent"] == uninterrupted["epsilon_spent"] <= 8.0


def test_no_hospital_spends_on_a_round_that_cannot_reach_min_hospitals(tiny_backbone_dir: Path, tmp_path: Path) -> None:
    files = site_files(tmp_path)
    files[1].write_text("text,label\nchest pain,cardio\n", encoding="utf-8")  # hospital_2's file is refused
    config = run_config(tiny_backbone_dir, tmp_path / "run", hospitals=3, rounds=3, **{"min-hospitals": 3})
    with pytest.raises(
        FederationError,
        match=r"round 1: only 2 hospital\(s\) can take part \(hospital_1, hospital_3\), fewer than min-hospitals=3, "
        r"so no hospital was asked to spend budget. Not taking part: hospital_2: records file refused",
    ):
        federate(real_grid(files, tmp_path, config), config)
    assert not ledger_path(tmp_path, 1).exists() and not ledger_path(tmp_path, 3).exists()  # no step taken anywhere


def test_a_second_node_with_a_hospitals_name_is_refused_and_spends_nothing(
    tiny_backbone_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = site_files(tmp_path)
    config = run_config(tiny_backbone_dir, tmp_path / "run", hospitals=3, rounds=2, **{"keep-updates": True})
    grid = real_grid(files, tmp_path, config)
    impostor = {**grid.nodes[2].context.node_config, "hospital": "hospital_1"}  # its own file, key and ledger
    grid.nodes[2] = RealHospital(2, impostor, config)
    results = federate(grid, config)

    for server_round in (1, 2):
        seen = hospitals_of(results, server_round)
        assert seen["hospital_1"]["status"] == "trained" and seen["hospital_1"]["node"] == "1"
        assert seen["hospital_1 (node 2)"]["status"] == FAILED
        assert seen["hospital_1 (node 2)"]["reason"].startswith("hospital name held by another node")
    assert "round 1: node 2 also calls itself hospital_1, which is node 1 in this run" in " ".join(results["events"])
    assert "another site already calls itself by this name" in caplog.text
    assert not ledger_path(tmp_path, 2).exists()  # the second node never took a step
    sent = load_file(tmp_path / "run" / "updates" / "round_001" / "hospital_1.safetensors")
    assert sent.keys() == {"prompt", "head.weight", "head.bias"}  # one hospital_1 update, from node 1
