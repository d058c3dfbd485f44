"""What crosses the wire between a hospital and the server, in Flower records. One definition.

Server -> hospital (query, train and evaluate): `arrays` (the global exchanged state) and `config`;
with query and train the config also holds `ledger-record`, the coordinator's record of that
hospital's ledger (medtune/ledger_record.py, as JSON text), for every node whose hospital it knows.
A query asks "can you take part in this round?" before anyone spends: the reply is `ready`,
`stopped` or `failed`.
Hospital -> server after training: `arrays` (its new prompt and head, nothing else), `metrics`
(num-examples, epsilon, delta, steps) and `hospital` (its name and status). The training loss stays
at the site: computed on its records without clipping or noise, it is outside epsilon.
Hospital -> server after evaluation: `metrics` (test counts per class, loss) and `hospital`.
A hospital whose budget is spent replies `status = "stopped"` and no arrays; one that cannot take
part (unreadable data file, corrupted ledger, bad node config) replies `status = "failed"`, the
reason and nothing else. `rejected` is the server's verdict on a reply that failed its checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from medtune.epsilon import EpsilonError, read_epsilon
from medtune.errors import (
    CodeNotApprovedError,
    ConfigError,
    DataError,
    EvaluationWithheldError,
    HospitalNameError,
    LedgerError,
    MedTuneError,
    PrivacyBudgetError,
    PrivacyTermsError,
    SecureAggregationError,
    StateError,
)

# the statuses replies carry
from medtune.federation.results import FAILED, REJECTED, STOPPED, TRAINED  # noqa: F401
from medtune.files import json_ready
from medtune.ledger_record import LedgerRecord, Spend
from medtune.metrics import Evaluation, from_counts

if TYPE_CHECKING:
    from flwr.app import ConfigRecordValues, ConfigScalar, MetricRecordValues

ARRAYS = "arrays"
METRICS = "metrics"
HOSPITAL = "hospital"
READY = "ready"
LEDGER_RECORD = "ledger-record"
# a stopped site's reason: fixed text, as failures'
BUDGET_SPENT = "its next round would pass its epsilon target"
TRAIN_METRICS = ("num-examples", "epsilon", "delta", "steps")  # exactly what train_reply sends


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(array)) for name, array in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: array.numpy() for name, array in record.items()}


def scalar(value: ConfigRecordValues) -> ConfigScalar:
    """A config or metric record value that is one number, text or bytes, as int() and float() read
    it.

    A list is refused with a TypeError, as int() and float() refuse it.
    """
    if isinstance(value, list):
        raise TypeError(f"expected a single value, got a list of {len(value)}")
    return value


@dataclass(frozen=True)
class TrainReport:
    """What a hospital reports after a round: plain numbers, and its new arrays unless it
    stopped."""

    arrays: dict[str, np.ndarray] | None  # None: the budget is spent, nothing was trained
    examples: int
    epsilon: float
    delta: float
    steps: int


def train_reply(report: TrainReport, hospital: str) -> RecordDict:
    content = RecordDict()
    metrics: dict[str, MetricRecordValues] = {
        "num-examples": int(report.examples),
        # inf (no DP) travels as itself: records carry IEEE floats
        "epsilon": float(report.epsilon),
        "delta": float(report.delta),
        "steps": int(report.steps),
    }
    if report.arrays is not None:
        content[ARRAYS] = to_record(report.arrays)
    content[METRICS] = MetricRecord(metrics)
    status, reason = (TRAINED, "") if report.arrays is not None else (STOPPED, BUDGET_SPENT)
    content[HOSPITAL] = ConfigRecord({"name": hospital, "status": status, "reason": reason})
    return content


def clear_report(report: TrainReport, hospital: str) -> dict[str, ConfigScalar]:
    """What a hospital tells the coordinator in clear in a secure round: who it is and its ledger's
    totals (the coordinator's record of each ledger needs them). Its arrays and example count travel
    masked."""
    return {
        "hospital": hospital,
        "status": TRAINED,
        "epsilon": float(report.epsilon),
        "delta": float(report.delta),
        "steps": int(report.steps),
    }


# What a failing site may tell the coordinator: a fixed category per error kind, nothing else.
FAILURE_CATEGORIES = (
    (CodeNotApprovedError, "code not approved by the site"),
    (HospitalNameError, "hospital name held by another node"),
    (SecureAggregationError, "update outside the secure aggregation's range"),
    (EvaluationWithheldError, "evaluation counts withheld by the site's terms"),
    (PrivacyTermsError, "privacy terms refused"),
    (DataError, "records file refused"),
    (LedgerError, "privacy ledger refused"),
    (PrivacyBudgetError, "privacy budget refused the round"),
    (StateError, "global state refused"),
    (ConfigError, "site configuration refused"),
)


def record_to_wire(record: LedgerRecord) -> str:
    """The coordinator's record of a ledger as one config value (JSON text): the same in plain and
    secure rounds."""
    spends = [
        [spend.round, spend.steps, json_ready(float(spend.epsilon))] for spend in record.spends
    ]
    return json.dumps({"hospital": record.hospital, "node": str(record.node), "spends": spends})


def record_from_wire(config: ConfigRecord | dict) -> LedgerRecord | None:
    """The ledger record an instruction's config carries (None: the coordinator does not know this
    node yet)."""
    wired = config.get(LEDGER_RECORD)
    if wired is None:
        return None
    try:
        record = json.loads(str(wired))
        spends = tuple(
            Spend(int(r), int(n), read_epsilon(e, "ledger record", spent=True))
            for r, n, e in record["spends"]
        )
        return LedgerRecord(
            hospital=str(record["hospital"]), node=int(str(record["node"])), spends=spends
        )
    except (KeyError, TypeError, ValueError, EpsilonError) as error:
        raise StateError(
            f"the coordinator's ledger record is malformed ({type(error).__name__}: {error})"
        ) from None


def ready_reply(hospital: str, ready: bool) -> RecordDict:
    """A site's answer to "can you take part?": ready, or stopped (its budget cannot pay the
    round)."""
    status, reason = (READY, "") if ready else (STOPPED, BUDGET_SPENT)
    return RecordDict(
        {HOSPITAL: ConfigRecord({"name": hospital, "status": status, "reason": reason})}
    )


def failure_reason(error: MedTuneError) -> str:
    """A site's error as it may leave the site: its category, never its message, nor a row number.

    Messages name record text, label values and paths on the site's disk (`row 1: label 'S: pt
    reports nausea...'`); those stay in the site's own log. Not even the row leaves: the coordinator
    chooses the label list, so the first row refused would tell it, run by run, each record's value.
    """
    category = next(
        (text for kind, text in FAILURE_CATEGORIES if isinstance(error, kind)), "site error"
    )
    return f"{category}; the details are in the site's own log"


def failed_reply(hospital: str, error: MedTuneError) -> RecordDict:
    """A hospital that cannot take part this round says which kind of failure, and sends nothing
    else."""
    return RecordDict(
        {
            HOSPITAL: ConfigRecord(
                {"name": hospital, "status": FAILED, "reason": failure_reason(error)}
            )
        }
    )


def evaluate_reply(evaluation: Evaluation, hospital: str) -> RecordDict:
    return RecordDict(
        {
            METRICS: MetricRecord(
                {
                    "num-examples": int(evaluation.examples),
                    "loss": float(evaluation.loss),
                    "support": [c.support for c in evaluation.per_class],
                    "predicted": [c.predicted for c in evaluation.per_class],
                    "correct": [c.correct for c in evaluation.per_class],
                }
            ),
            HOSPITAL: ConfigRecord({"name": hospital, "status": "evaluated", "reason": ""}),
        }
    )


def counts_vector(evaluation: Evaluation) -> np.ndarray:
    """A hospital's evaluation as one vector, for secure summation: per-class support, predictions
    and correct ones, then the summed loss. Sums of these vectors pool hospitals exactly
    (`from_counts_vector`)."""
    per_class = evaluation.per_class
    counts = (
        [c.support for c in per_class]
        + [c.predicted for c in per_class]
        + [c.correct for c in per_class]
    )
    return np.array([*counts, evaluation.loss * evaluation.examples], dtype=np.float64)


def from_counts_vector(total: np.ndarray, labels: tuple[str, ...]) -> Evaluation:
    """The pooled evaluation from the sum of the hospitals' `counts_vector`s (counts rounded to
    whole records)."""
    k = len(labels)
    counts = [max(0, int(round(float(value)))) for value in total[: 3 * k]]
    support, predicted, correct = counts[:k], counts[k : 2 * k], counts[2 * k :]
    examples = sum(support)
    return from_counts(
        labels,
        support,
        predicted,
        correct,
        loss=float(total[3 * k]) / examples if examples else 0.0,
    )


def _counts(metrics: MetricRecord, key: str) -> list[int]:
    """A per-class count list of an evaluation reply; one number instead of a list is a
    TypeError."""
    value = metrics[key]
    if not isinstance(value, list):
        raise TypeError(
            f"metric {key!r} must be a list of per-class counts, got {type(value).__name__}"
        )
    return [int(count) for count in value]


def evaluation_from_reply(message: Message, labels: tuple[str, ...]) -> Evaluation:
    metrics = message.content.metric_records[METRICS]
    return from_counts(
        labels,
        support=_counts(metrics, "support"),
        predicted=_counts(metrics, "predicted"),
        correct=_counts(metrics, "correct"),
        loss=float(scalar(metrics["loss"])),
    )


def hospital_of(message: Message, unnamed: str) -> tuple[str, str, str]:
    """(name, status, reason) of a reply; a reply that names no hospital (an error) is called
    `unnamed`."""
    if message.has_error():
        return unnamed, FAILED, message.error.reason or ""  # Flower's Error may carry no reason
    info = message.content.config_records.get(HOSPITAL)
    if info is None:
        return unnamed, FAILED, "reply carries no hospital record"
    return (
        str(info.get("name", unnamed)),
        str(info.get("status", FAILED)),
        str(info.get("reason", "")),
    )
