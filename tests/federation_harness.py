"""The in-process federation the coordinator tests share: a fake Grid, hospitals that answer it,
and the run config and results they use.

server/federation.py is driven through a fake Grid whose nodes are functions from a Flower Message
to a reply: either crafted replies (`CraftedHospital`: fast, exact) or the real ClientApp handlers
on real per-hospital files and ledgers (`RealHospital`, `real_grid`). A test module that builds
Messages imports the autouse fixture `task_identity`. The Flower internals this needs are in
tests/flower_internals.py.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import tiny_recipe
from flower_internals import set_task_identity, stamp_message_id
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

import client.app as client_app
from medtune.federation.overrides import resolve_run_config
from medtune.federation.wire import (
    ARRAYS,
    HOSPITAL,
    METRICS,
    evaluate_reply,
    from_record,
    ready_reply,
    to_record,
)
from medtune.metrics import from_counts
from medtune.run_config import settings_from_run_config
from medtune.synth import LABELS, SynthConfig, write_hospitals
from server.federation import Federation

Node = Callable[[Message], Message]
Arrays = dict[str, np.ndarray]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps every Message with the running task's identity; the runtimes set it, here we
    do."""
    set_task_identity(monkeypatch, task_id=1, run_id=1, node_id=0)


class FakeGrid:
    """The Grid calls the round loop makes, answered in-process by one function per node.

    A node answers when its message is pushed; its reply can be pulled at once, or after
    `delays[node]` seconds (a site that waits its turn). A node that returns None never answers.
    """

    def __init__(self, nodes: dict[int, Node], delays: dict[int, float] | None = None) -> None:
        self.nodes = nodes
        self.delays = delays or {}
        self.pending: dict[str, tuple[float, Message]] = {}  # message id -> (when pullable, reply)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        message_ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            stamp_message_id(message, message_id)  # Flower's grids stamp ids on sending
            node = message.metadata.dst_node_id
            # each node gets its own copy, as after serialisation
            reply = self.nodes[node](copy.deepcopy(message))
            if reply is not None:
                self.pending[message_id] = (time.monotonic() + self.delays.get(node, 0.0), reply)
            message_ids.append(message_id)
        return message_ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies due by now, in the order their messages were pushed."""
        wanted, now = set(message_ids), time.monotonic()
        due = [m for m, (when, _) in self.pending.items() if m in wanted and when <= now]
        return [self.pending.pop(message_id)[1] for message_id in due]

    def send_and_receive(
        self, messages: Iterable[Message], timeout: float | None = None
    ) -> list[Message]:
        """As the SecAgg+ workflow calls it: the replies there are now (none waits on a silent
        node)."""
        return self.pull_messages(self.push_messages(messages))


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


Tamper = Callable[[Arrays, dict[str, Any]], None]


def honest(arrays: Arrays, metrics: dict[str, Any]) -> None:
    """Leave the reply as an honest hospital sends it."""


class CraftedHospital:
    """Replies with the global state plus a small seeded step, or a tampered version of it."""

    def __init__(
        self, name: str, examples: int, tamper: Tamper = honest, step: float = 0.01
    ) -> None:
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
        metrics: dict[str, Any] = {
            "num-examples": self.examples,
            "epsilon": 1.0,
            "delta": 1e-5,
            "steps": steps,
        }
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


class RealHospital:
    """The real ClientApp handlers, as a deployed SuperNode runs them (its own file and ledger)."""

    def __init__(self, node_id: int, node_config: dict[str, str], config: dict[str, Any]) -> None:
        self.context = Context(
            run_id=1,
            node_id=node_id,
            node_config=node_config,
            state=RecordDict(),
            run_config=config,
        )

    def __call__(self, message: Message) -> Message:
        # the ClientApp with its mods, as a SuperNode calls it
        return client_app.app(message, self.context)


def site_files(tmp_path: Path) -> list[Path]:
    return write_hospitals(SynthConfig(hospitals=3, mean_records=60, seed=0), tmp_path / "data")


def real_grid(files: list[Path], tmp_path: Path, config: dict[str, Any]) -> FakeGrid:
    return FakeGrid(
        {
            i: RealHospital(
                i,
                {
                    "hospital": f"hospital_{i}",
                    "data-path": str(path),
                    "ledger-path": str(ledger_path(tmp_path, i)),
                    "text-column": "text",
                    "label-column": "label",
                    # each site's ceiling: what these runs ask for
                    "max-epsilon": config["epsilon"],
                    # these sites consent to report their test counts
                    "share-evaluation-counts": True,
                },
                config,
            )
            for i, path in enumerate(files, start=1)
        }
    )


def ledger_path(tmp_path: Path, number: int) -> Path:
    return tmp_path / "sites" / f"hospital_{number}" / "ledger.json"


def first_round_of(
    backbone: Path, tmp_path: Path, rounds: int
) -> tuple[list[Path], dict[str, Any]]:
    """Three real hospitals train round 1 of `rounds` and stop; returns their files and the config
    that resumes."""
    files = site_files(tmp_path)
    config = run_config(
        backbone, tmp_path / "run", hospitals=3, rounds=rounds, **{"until-round": 1}
    )
    federate(real_grid(files, tmp_path, config), config)
    return files, {**config, "until-round": 0, "resume": str(tmp_path / "run")}
