"""Benchmark, not product: what secure aggregation costs per round, against a plain round, at 3, 10
and 30 hospitals.

Each hospital is a simulated site running MedTune's real ClientApp (mods included) in this one
process; MedTune's real round loop (server.federation) drives them through an in-process grid that
delivers each message as Flower would (its own copy) and counts every message's serialised size
(Flower's protobuf), both ways. No Ray, so the figures are the protocol's and the training's cost,
not the simulation engine's. Round 1 builds each site's feature cache, so round 2 is the one timed.

    python docs/benchmarks/secure_aggregation_cost.py 3 10 30

Prints one JSON line per (hospitals, mode): seconds for round 2, and KiB per hospital for round 2
(down and up, every stage's messages included). Settings: the embedded MiniLM cut to 2 layers,
prompt at layer 1, 32 tokens, 40 records per hospital, min-hospitals 3.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import uuid
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.common.serde import message_to_proto
from flwr.supercore.task_identity import TaskIdentity

import client.app as client_app
from medtune.federation.overrides import resolve_run_config
from medtune.run_config import settings_from_run_config
from server.federation import Federation

SMALL = {
    "num-layers": 2,
    "prompt-layer": 1,
    "max-length": 32,
    "records-per-hospital": 40,
    "min-hospitals": 3,
}


def round_of(message: Message) -> int:
    """The round a message belongs to: its config's server-round, or the SecAgg+ stage's group
    id."""
    for name in ("config", "fitins.config"):
        record = message.content.config_records.get(name)
        if record is not None and "server-round" in record:
            return int(record["server-round"])
    return int(message.metadata.group_id) if message.metadata.group_id.isdigit() else 0


class CountingGrid:
    """Delivers each message to its node's ClientApp in-process and counts every message's bytes,
    per round."""

    def __init__(self, contexts: dict[int, Context]) -> None:
        self.contexts = contexts
        self.bytes: dict[tuple[int, str], int] = {}  # (round, "down" | "up") -> bytes
        self.replies: dict[str, Message] = {}  # message id -> its reply, until pulled

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def count(self, server_round: int, direction: str, message: Message) -> None:
        key = (server_round, direction)
        self.bytes[key] = self.bytes.get(key, 0) + message_to_proto(message).ByteSize()

    def push_messages(self, messages):  # noqa: ANN001, ANN201 - Grid's signature
        message_ids = []
        for message in messages:
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id
            server_round = round_of(message)
            self.count(server_round, "down", message)
            reply = client_app.app(
                copy.deepcopy(message), self.contexts[message.metadata.dst_node_id]
            )
            self.count(server_round, "up", reply)
            self.replies[message_id] = reply
            message_ids.append(message_id)
        return message_ids

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201 - Grid's signature
        return [self.replies.pop(m) for m in message_ids if m in self.replies]

    def send_and_receive(self, messages, timeout=None):  # noqa: ANN001, ANN201 - Grid's signature
        return self.pull_messages(self.push_messages(messages))


def measure(hospitals: int, secure: bool, out: Path) -> dict[str, object]:
    config = resolve_run_config(
        None,
        {
            **SMALL,
            "hospitals": hospitals,
            "rounds": 2,
            "out": str(out),
            "secure-aggregation": secure,
        },
    )
    contexts = {
        node: Context(
            run_id=1,
            node_id=node,
            node_config={"partition-id": node - 1},
            state=RecordDict(),
            run_config=config,
        )
        for node in range(1, hospitals + 1)
    }
    grid = CountingGrid(contexts)
    results = Federation(grid, settings_from_run_config(config)).run()  # type: ignore[arg-type]
    second = results.rounds[1]
    return {
        "hospitals": hospitals,
        "secure": secure,
        "aggregated": second.aggregated,
        "accuracy": second.accuracy,
        "round_2_seconds": round(second.wall_seconds, 2),
        "kib_down_per_hospital": round(grid.bytes.get((2, "down"), 0) / hospitals / 1024, 1),
        "kib_up_per_hospital": round(grid.bytes.get((2, "up"), 0) / hospitals / 1024, 1),
    }


def main() -> None:
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = (
        1,
        1,
        0,
    )  # what Flower's runtimes stamp
    for hospitals in [int(arg) for arg in sys.argv[1:]] or [3, 10, 30]:
        for secure in (False, True):
            with tempfile.TemporaryDirectory() as folder:
                print(json.dumps(measure(hospitals, secure, Path(folder))), flush=True)


if __name__ == "__main__":
    main()
