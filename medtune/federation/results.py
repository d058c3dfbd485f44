"""A federated run's record: per round, global and per-hospital metrics, epsilon and bytes.

`results.json` is rewritten atomically after every round, so an interrupted run keeps every
finished round, and a resumed run continues the same file. The per-round table printed to the
console is rendered from the same record.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from medtune.epsilon import NO_DP, EpsilonError, read_epsilon
from medtune.errors import CheckpointError
from medtune.files import atomic_write_json

RESULTS_FILE = "results.json"
# A hospital's status in a round, as replies carry it (medtune/federation/wire.py) and the record
# keeps it.
TRAINED, STOPPED, FAILED, REJECTED = "trained", "stopped", "failed", "rejected"
# with keep-updates: the global state a round's updates were trained from
SENT_STATE = "_sent.safetensors"


def updates_folder(out: Path, server_round: int) -> Path:
    """Where `keep-updates` keeps one round's received updates (`<hospital>.safetensors`) and
    SENT_STATE."""
    return out / "updates" / f"round_{server_round:03d}"


@dataclass
class HospitalRound:
    """One hospital in one round, as the server saw it."""

    name: str
    # trained | stopped (budget spent) | failed (the hospital's reason) | rejected (the server's
    # reason)
    status: str
    examples: int = 0
    epsilon: float | None = None
    delta: float | None = None
    steps: int = 0
    test_examples: int = 0
    accuracy: float | None = None
    macro_f1: float | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    received: dict[str, Any] = field(default_factory=dict)  # array names -> shape and dtype
    reason: str = ""
    # L2 distance of an accepted update from the global state it was trained on
    update_norm: float | None = None
    node: str = ""  # the Flower node it answered from (text: node ids are unsigned 64-bit)


@dataclass
class RoundRecord:
    round: int
    aggregated: bool
    accuracy: float | None
    macro_f1: float | None
    loss: float | None
    worst_accuracy: float | None
    wall_seconds: float
    hospitals: list[HospitalRound]
    # through secure aggregation: each hospital's examples and scores are hidden from the
    # coordinator
    secure: bool = False


def _hospital_round(stored: dict[str, Any], path: Path) -> HospitalRound:
    """A hospital's line as results.json stores it, its epsilon read back from text ("inf": no
    DP)."""
    epsilon = stored.get("epsilon")
    source = f"{path} {stored.get('name')}"
    # written before it left the wire
    stored = {key: value for key, value in stored.items() if key != "train_loss"}
    return HospitalRound(
        **{
            **stored,
            "epsilon": None if epsilon is None else read_epsilon(epsilon, source, spent=True),
        }
    )


@dataclass
class RunResults:
    config: dict[str, Any]
    rounds: list[RoundRecord] = field(default_factory=list)
    events: list[str] = field(default_factory=list)

    def save(self, out: Path) -> Path:
        path = out / RESULTS_FILE
        atomic_write_json(path, asdict(self))  # epsilon = inf is written "inf" (medtune/files.py)
        return path

    def epsilon_per_hospital(self) -> dict[str, float]:
        """Each hospital's epsilon as it last reported it (inf without DP)."""
        spent: dict[str, float] = {}
        for record in self.rounds:
            for hospital in record.hospitals:
                if hospital.epsilon is not None:
                    spent[hospital.name] = hospital.epsilon
        return spent

    @classmethod
    def load(cls, out: Path, up_to_round: int) -> "RunResults":
        """The record of a run being resumed, cut back to the checkpoint's round."""
        path = out / RESULTS_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            rounds = [
                RoundRecord(
                    **{**r, "hospitals": [_hospital_round(h, path) for h in r["hospitals"]]}
                )
                for r in raw["rounds"]
                if r["round"] <= up_to_round
            ]
            return cls(config=raw["config"], rounds=rounds, events=list(raw.get("events", [])))
        except FileNotFoundError:
            return cls(config={})
        except (OSError, ValueError, KeyError, TypeError, EpsilonError) as error:
            raise CheckpointError(
                f"{path}: corrupted run results ({type(error).__name__}: {error})"
            ) from None


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return NO_DP
    return f"{value:.{digits}f}"


HIDDEN = "hidden"  # what secure aggregation keeps from the coordinator, in its table


def round_table(record: RoundRecord, rounds: int) -> Table:
    """The compact per-round table: global metrics in the title, one row per hospital."""
    worst = HIDDEN if record.secure else _fmt(record.worst_accuracy)
    title = (
        f"round {record.round}/{rounds}: accuracy {_fmt(record.accuracy)}  macro-F1 "
        f"{_fmt(record.macro_f1)}  worst hospital {worst}  ({record.wall_seconds:.1f} s"
        f"{'' if record.aggregated else ', not aggregated: too few valid updates'})"
    )
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False, box=None)
    for column in ("hospital", "status", "n", "epsilon", "acc", "F1", "KiB down", "KiB up"):
        table.add_column(
            column, justify="left" if column in ("hospital", "status") else "right", no_wrap=True
        )
    for h in record.hospitals:
        hidden = record.secure and h.status != FAILED
        table.add_row(
            h.name,
            h.status,
            HIDDEN if hidden else str(h.examples),
            _fmt(h.epsilon, 2),
            HIDDEN if hidden else _fmt(h.accuracy),
            HIDDEN if hidden else _fmt(h.macro_f1),
            f"{h.bytes_down / 1024:.1f}",
            f"{h.bytes_up / 1024:.1f}",
        )
    return table


def print_round(record: RoundRecord, rounds: int, console: Console | None = None) -> None:
    (console or Console()).print(round_table(record, rounds))
