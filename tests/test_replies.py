"""Waiting for replies and reading them (server/replies.py): the coordinator waits while replies
keep coming, gives up on a node only after round-timeout seconds with no new reply, and reads each
training reply's epsilon once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from call_counts import counting_calls, epsilon_sources
from federation_harness import (
    CraftedHospital,
    FakeGrid,
    federate,
    hospitals_of,
    run_config,
    task_identity,  # noqa: F401 - the autouse fixture, for every test here
)
from flwr.app import Message, MessageType, MetricRecord, RecordDict

from medtune.epsilon import read_epsilon
from medtune.errors import StateError
from medtune.federation.overrides import resolve_run_config
from medtune.federation.wire import ARRAYS, FAILED, METRICS, TRAINED, to_record
from medtune.run_config import settings_from_run_config
from medtune.state import ExchangedStateSpec
from server.federation import Federation
from server.replies import TrainMetrics, collect_replies, read_train_metrics
from server.validation import check_train_reply

TIMEOUT = 0.4
# Each reply comes within TIMEOUT of the one before, but the last comes well after TIMEOUT.
STAGGERED = {1: 0.25, 2: 0.5, 3: 0.75}


def answers(message: Message) -> Message:
    return Message(RecordDict(), reply_to=message)


def never_answers(message: Message) -> None:
    return None


def test_the_wait_ends_after_timeout_seconds_with_no_new_reply_not_in_total() -> None:
    grid = FakeGrid({1: answers, 2: answers, 3: answers, 4: never_answers}, delays=STAGGERED)
    messages = [
        Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY)
        for node in (1, 2, 3, 4)
    ]
    started = time.monotonic()
    replies = collect_replies(grid, messages, timeout=TIMEOUT)
    waited = time.monotonic() - started
    assert [reply.metadata.reply_to_message_id for reply in replies] == [
        message.metadata.message_id for message in messages[:3]
    ]
    # the silent node is given up on TIMEOUT after the last reply, not before, and not much later
    assert STAGGERED[3] + TIMEOUT <= waited < STAGGERED[3] + TIMEOUT + 0.5


def test_hospitals_answering_one_by_one_all_train_and_a_silent_one_is_reported(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    nodes = {i: CraftedHospital(f"hospital_{i}", 100) for i in (1, 2, 3)}
    config = run_config(tiny_backbone_dir, tmp_path, hospitals=4, **{"round-timeout": TIMEOUT})
    results = federate(FakeGrid({**nodes, 4: never_answers}, delays=STAGGERED), config)

    seen = hospitals_of(results, 1)
    assert [seen[f"hospital_{i}"]["status"] for i in (1, 2, 3)] == [TRAINED] * 3
    assert seen["node 4"]["status"] == FAILED
    assert seen["node 4"]["reason"] == "no reply to the readiness query"
    assert "round 1: no readiness reply within 0.4 s from node 4" in results["events"]
    assert "round 1: node 4 failed: no reply to the readiness query" in results["events"]
    assert results["rounds"][0]["aggregated"]


def test_each_training_reply_s_epsilon_is_read_once(
    tiny_backbone_dir: Path, tmp_path: Path
) -> None:
    nodes = {i: CraftedHospital(f"hospital_{i}", 100) for i in (1, 2, 3)}
    config = run_config(tiny_backbone_dir, tmp_path, hospitals=3)
    federation = Federation(FakeGrid(nodes), settings_from_run_config(config))  # type: ignore[arg-type]
    with counting_calls(read_epsilon) as calls:
        federation.run()
    # the three replies of the one round, each read for its record and its checks at once
    assert epsilon_sources(calls) == ["", "", ""]
    assert [args[0] for args, _ in calls["read_epsilon"]] == [1.0, 1.0, 1.0]


def test_a_reply_s_metrics_are_read_once_and_the_checks_judge_that_reading(tmp_path: Path) -> None:
    spec = ExchangedStateSpec(prompt_length=4, hidden_size=32, num_labels=5)
    arrays = {name: np.zeros(shape, np.float32) for name, shape in spec.shapes.items()}
    federation = settings_from_run_config(
        resolve_run_config(None, {"out": str(tmp_path)})
    ).federation

    def reply(**changed: Any) -> Message:
        metrics = {"num-examples": 100, "epsilon": 1.0, "delta": 1e-5, "steps": 3, **changed}
        content = RecordDict({ARRAYS: to_record(arrays), METRICS: MetricRecord(metrics)})
        return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)

    def check(message: Message, metrics: TrainMetrics) -> int:
        return check_train_reply(message, "hospital_1", metrics, spec, arrays, federation).examples

    honest = reply()
    assert read_train_metrics(honest) == TrainMetrics(100, 1.0, 1e-5, 3)
    assert check(honest, read_train_metrics(honest)) == 100

    # The record keeps what could be read before the first bad value; the checks say what was bad.
    nan = reply(epsilon=float("nan"))
    metrics = read_train_metrics(nan)
    assert (metrics.examples, metrics.epsilon, metrics.delta, metrics.steps) == (100, None, None, 0)
    with pytest.raises(StateError, match="^update from hospital_1: epsilon is NaN"):
        check(nan, metrics)
    fraction = reply(**{"num-examples": 12.5})
    metrics = read_train_metrics(fraction)
    assert (metrics.examples, metrics.epsilon, metrics.steps) == (12, 1.0, 3)
    with pytest.raises(
        StateError, match="^update from hospital_1: num-examples must be a whole number, got 12.5$"
    ):
        check(fraction, metrics)
