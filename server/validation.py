"""Checks on one hospital's training reply before it may reach the aggregate.

Flower's strategies trust what they are given: FedAvg weights each reply by whatever
`num-examples` it claims, one NaN or one 1e30 entry poisons a mean, and Flower's own consistency
check gives up on the whole round when one reply carries an extra record or key. So every reply
is checked on its own here, and a bad one is rejected for this round with a reason that names the
hospital; the strategy then sees only clean copies of the accepted updates (server.strategy).

What a reply must be:
- exactly the exchanged state (names, shapes, float32, finite values: `ExchangedStateSpec.check`)
  and exactly the metrics `medtune.federation.wire.train_reply` sends, nothing else;
- within `max-update-norm` of the global state it was trained from (see `update_norm`);
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

from medtune.epsilon import EpsilonError, read_epsilon
from medtune.errors import StateError
from medtune.run_config import FederationConfig
from medtune.state import HOSPITAL_NAME, ExchangedStateSpec
from medtune.federation.wire import ARRAYS, METRICS, TRAIN_METRICS, from_record


@dataclass(frozen=True)
class CheckedUpdate:
    """An accepted update: the checked arrays, the records they were trained on, their distance moved."""

    hospital: str
    node_id: int
    arrays: "OrderedDict[str, np.ndarray]"
    examples: int
    norm: float


def update_norm(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 norm of (update - reference) over all exchanged arrays at once, computed in float64.

    The distance moved in one round rather than the norm of the whole state: the prompt starts as
    vocabulary embeddings, so the state's own norm depends on the backbone and says nothing about
    one hospital's step, while the distance moved is what one hospital can push the aggregate by.
    An honest hospital's distance is bounded by its optimiser: Adam moves each coordinate by about
    the learning rate per step (at most ~3x), so a round moves the state by at most about
    3 x lr x steps x sqrt(parameters), and under DP noise by far less.
    Measured on the default run (full MiniLM-L6, prompt at layer 5, P=16, 8,069 parameters, lr 0.01,
    1 local epoch = 5 to 8 steps a round, epsilon 8, 5 rounds, seed 0): 1.1 to 3.1 for every hospital
    and round, against a worst case of about 40; the tiny test federation moves 1.6 to 1.8 (earlier
    2-layer recipe: 3.4 to 4.3). The default `max-update-norm` = 100 is 30x the measured distance and above
    that worst case, so no honest default update is refused, while a scaled, garbled or runaway
    update (1e3 and up) is. Raise it for larger learning rates, more local epochs or much larger
    hospitals (`update_norm` in results.json shows each accepted update's distance).
    """
    squares = sum(np.sum(np.square(update[name].astype(np.float64) - reference[name])) for name in reference)
    return float(np.sqrt(squares))


def _examples(value: object, hospital: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateError(f"update from {hospital}: num-examples must be a whole number, got {value!r}")
    if not 1 <= value <= maximum:
        raise StateError(
            f"update from {hospital}: claims {value} training examples; a hospital must train on between 1 and "
            f"max-examples={maximum} records"
        )
    return value


def check_train_reply(
    reply: Message,
    hospital: str,
    spec: ExchangedStateSpec,
    global_arrays: dict[str, np.ndarray],
    federation: FederationConfig,
) -> CheckedUpdate:
    """The reply's update if it passes every check; otherwise a StateError naming hospital and reason."""
    content = reply.content
    if not HOSPITAL_NAME.fullmatch(hospital):
        raise StateError(f"update from {hospital!r}: not a valid hospital name (pattern {HOSPITAL_NAME.pattern})")
    if set(content.array_records) != {ARRAYS} or set(content.metric_records) != {METRICS}:
        raise StateError(
            f"update from {hospital}: must hold array record '{ARRAYS}' and metric record '{METRICS}' only; got "
            f"arrays {sorted(content.array_records)}, metrics {sorted(content.metric_records)}"
        )
    metrics = content[METRICS]
    if set(metrics) != set(TRAIN_METRICS):
        raise StateError(f"update from {hospital}: metrics must be exactly {list(TRAIN_METRICS)}; got {sorted(metrics)}")
    examples = _examples(metrics["num-examples"], hospital, federation.max_examples)
    try:
        read_epsilon(metrics["epsilon"], f"update from {hospital}", spent=True)
    except EpsilonError as error:
        raise StateError(str(error)) from None
    try:
        received = from_record(content[ARRAYS])
    except Exception as error:  # a crafted Array's bytes may not deserialise; numpy raises several types
        raise StateError(f"update from {hospital}: arrays cannot be read ({type(error).__name__}: {error})") from None
    arrays = spec.check(received, source=f"update from {hospital}")
    norm = update_norm(arrays, global_arrays)
    if not norm <= federation.max_update_norm:
        raise StateError(
            f"update from {hospital}: moved the global prompt and head by L2 norm {norm:.4g}, more than "
            f"max-update-norm={federation.max_update_norm:g}"
        )
    return CheckedUpdate(hospital, reply.metadata.src_node_id, arrays, examples, norm)
