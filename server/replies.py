"""The coordinator's side of one exchange: send, wait while replies keep coming, read each reply
once.

A reply is read into a `Reply` (the node it was sent to, who it says it is, its message) as it
arrives, and a training reply's numbers into `TrainMetrics` once: the hospital's record and the
update checks (server.validation) both use that one reading, so each reply's epsilon is read by
exactly one `read_epsilon` call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from medtune.epsilon import EpsilonError, read_epsilon
from medtune.federation.wire import METRICS, hospital_of, scalar

# How often the SuperLink is asked for replies: at the pace of Flower's in-memory grid right after
# a send or a reply, slowing to that of its gRPC grid while none comes.
FIRST_POLL_SECONDS, LAST_POLL_SECONDS = 0.1, 3.0


class IdleDeadline:
    """A wait's end, `timeout` seconds after its last progress (a reply, a new connection) rather
    than at a fixed time: many sites answering in turn, a few at a time, are all waited for, while
    `timeout` seconds of silence still end the wait."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.progressed()

    def progressed(self) -> None:
        self._end = time.monotonic() + self.timeout

    def remaining(self) -> float:
        return self._end - time.monotonic()


def collect_replies(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Send `messages`; collect their replies until all have come or `timeout` seconds pass with no
    new one.

    Flower's `Grid.send_and_receive` gives all the replies one deadline in total. A simulation runs
    a few ClientApps at a time, so with many hospitals each answers promptly when its turn comes
    while all of them together outlast any fixed deadline (docs/benchmarks.md §6). So the deadline
    moves forward with each reply, and only `timeout` seconds of silence end the wait. Written
    with the Grid's public `push_messages` and `pull_messages`, as `send_and_receive` is.
    """
    waiting = [message_id for message_id in grid.push_messages(messages) if message_id]
    replies: list[Message] = []
    deadline, pause = IdleDeadline(timeout), FIRST_POLL_SECONDS
    while waiting:
        new = list(grid.pull_messages(waiting))
        if new:
            replies.extend(new)
            answered = {reply.metadata.reply_to_message_id for reply in new}
            waiting = [message_id for message_id in waiting if message_id not in answered]
            deadline.progressed()
            pause = FIRST_POLL_SECONDS
        remaining = deadline.remaining()
        if not waiting or remaining <= 0:
            break
        time.sleep(min(pause, remaining))
        pause = min(2 * pause, LAST_POLL_SECONDS)
    return replies


@dataclass(frozen=True)
class Reply:
    """One reply, read once: the node it was sent to, the hospital it names, its status and reason,
    and the message itself."""

    node: int
    name: str
    status: str
    reason: str
    message: Message

    @classmethod
    def read(cls, message: Message, node: int, unnamed: str) -> Reply:
        """`message` as sent back by `node`; a reply that names no hospital (an error) is
        `unnamed`."""
        name, status, reason = hospital_of(message, unnamed)
        return cls(node, name, status, reason, message)


@dataclass(frozen=True)
class TrainMetrics:
    """The numbers a training reply reports, read once: for the hospital's record, and for the
    update checks, which judge the two problems kept here (without the "update from <hospital>: "
    they add).

    Read in the order the site writes them (medtune.federation.wire.train_reply): the first value
    that cannot be read leaves itself and the ones after it at the record's defaults.
    """

    examples: int = 0
    epsilon: float | None = None
    delta: float | None = None
    steps: int = 0
    examples_problem: str = ""  # why num-examples is not a whole number ("" when it is)
    epsilon_problem: str = ""  # why epsilon cannot be read ("" when it can)


def read_train_metrics(message: Message) -> TrainMetrics:
    """The training metrics of one reply; defaults when it holds none (the checks then reject a
    trained reply and say why)."""
    metrics = message.content.metric_records.get(METRICS)
    if metrics is None:
        return TrainMetrics()
    sent = metrics.get("num-examples", 0)
    whole = isinstance(sent, int) and not isinstance(sent, bool)
    read: dict[str, Any] = {
        "examples_problem": "" if whole else f"num-examples must be a whole number, got {sent!r}"
    }
    try:
        read["examples"] = int(scalar(sent))
        read["epsilon"] = read_epsilon(metrics.get("epsilon", 0.0), "", spent=True)
        read["delta"] = float(scalar(metrics.get("delta", 0.0)))
        read["steps"] = int(scalar(metrics.get("steps", 0)))
    except (TypeError, ValueError, OverflowError, EpsilonError) as error:
        if "examples" in read and "epsilon" not in read:  # epsilon is what could not be read
            read["epsilon_problem"] = str(error)
    return TrainMetrics(**read)
