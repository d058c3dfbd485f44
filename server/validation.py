"""Checks on one hospital's training reply before it may reach the aggregate.

Flower's strategies trust what they are given: FedAvg weights each reply by whatever
`num-examples` it claims, one NaN or one 1e30 entry poisons a mean, and Flower's own consistency
check gives up on the whole round when one reply carries an extra record or key. So every reply
is checked on its own here, and a bad one is rejected for this round with a reason that names the
hospital; the strategy then sees only clean copies of the accepted updates (server.strategy).

What a reply must be:
- exactly the exchanged state (names, shapes, float32, finite values: `ExchangedStateSpec.check`)
  and exactly the metrics `medtune.federation.wire.train_reply` sends, nothing else;
- within `max-update-norm` of the global state it was trained from (see
  `medtune.state.update_norm`);
- from a hospital whose name is a plain name (it names the file its update is kept in);
- trained on a plausible number of records: a whole number from 1 to `max-examples`. The count is
  the hospital's train-split size (it weights the hospital in FedAvg), so the cap bounds how much
  of the aggregate one hospital can claim, whatever it says.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from medtune.errors import StateError
from medtune.federation.wire import ARRAYS, METRICS, TRAIN_METRICS, from_record
from medtune.run_config import FederationConfig
from medtune.state import HOSPITAL_NAME, ExchangedStateSpec, update_norm
from server.replies import TrainMetrics


@dataclass(frozen=True)
class CheckedUpdate:
    """An accepted update: the checked arrays, the records they were trained on, their distance
    moved."""

    hospital: str
    node_id: int
    arrays: "OrderedDict[str, np.ndarray]"
    examples: int
    norm: float


def _examples(metrics: TrainMetrics, hospital: str, maximum: int) -> int:
    if metrics.examples_problem:
        raise StateError(f"update from {hospital}: {metrics.examples_problem}")
    if not 1 <= metrics.examples <= maximum:
        raise StateError(
            f"update from {hospital}: claims {metrics.examples} training examples; a hospital "
            f"must train on between 1 and max-examples={maximum} records"
        )
    return metrics.examples


def check_train_reply(
    reply: Message,
    hospital: str,
    metrics: TrainMetrics,
    spec: ExchangedStateSpec,
    global_arrays: dict[str, np.ndarray],
    federation: FederationConfig,
) -> CheckedUpdate:
    """The reply's update if it passes every check; otherwise a StateError naming hospital and
    reason. `metrics` is the reply's metrics as read once for its record (server.replies)."""
    content = reply.content
    if not HOSPITAL_NAME.fullmatch(hospital):
        raise StateError(
            f"update from {hospital!r}: not a valid hospital name (pattern {HOSPITAL_NAME.pattern})"
        )
    if set(content.array_records) != {ARRAYS} or set(content.metric_records) != {METRICS}:
        raise StateError(
            f"update from {hospital}: must hold array record '{ARRAYS}' and metric record "
            f"'{METRICS}' only; got arrays {sorted(content.array_records)}, metrics "
            f"{sorted(content.metric_records)}"
        )
    sent_metrics = content.metric_records[METRICS]
    if set(sent_metrics) != set(TRAIN_METRICS):
        raise StateError(
            f"update from {hospital}: metrics must be exactly {list(TRAIN_METRICS)}; got "
            f"{sorted(sent_metrics)}"
        )
    examples = _examples(metrics, hospital, federation.max_examples)
    if metrics.epsilon_problem:
        raise StateError(f"update from {hospital}: {metrics.epsilon_problem}")
    try:
        received = from_record(content.array_records[ARRAYS])
    # a crafted Array's bytes may not deserialise; numpy raises several types
    except Exception as error:
        raise StateError(
            f"update from {hospital}: arrays cannot be read ({type(error).__name__}: {error})"
        ) from None
    arrays = spec.check(received, source=f"update from {hospital}")
    norm = update_norm(arrays, global_arrays)
    if not norm <= federation.max_update_norm:
        raise StateError(
            f"update from {hospital}: moved the global prompt and head by L2 norm {norm:.4g}, more "
            f"than max-update-norm={federation.max_update_norm:g}"
        )
    return CheckedUpdate(hospital, reply.metadata.src_node_id, arrays, examples, norm)
