"""Secure aggregation with Flower's SecAgg+, whose only home in Flower 1.42 is the legacy layer:
fenced here.

With `secure-aggregation = true` a round's training goes through Flower's `SecAggPlusWorkflow`
(server) and `secaggplus_mod` (site) instead of plain messages. Each ready hospital quantises its
update weighted by its training-split size, masks it with pairwise and private masks, and sends
only the masked vector; the coordinator unmasks the sum and learns the weighted mean of the
prompts and heads, never one hospital's arrays or example count. Flower does the cryptography
(Shamir shares, key agreement, masking, quantisation); this module only drives it:

- `secure_mean` runs the four SecAgg+ stages for one round from MedTune's own round loop, with a
  legacy `Strategy` stand-in that hands each node its own instruction (the global state and the
  config with the coordinator's record of its ledger) and collects the unmasked mean.
- `site_mod` is the site's ClientApp mod. It checks the coordinator's SecAgg+ parameters against
  what a site needs (at least 3 hospitals, a reconstruction threshold above half the shares, no
  sum that could overflow the modulus) before any key is made, passes the stages to
  `secaggplus_mod`, and blanks the clear example count Flower's legacy reply shape carries.
- `secure_instruction` / `secure_reply` read and write the legacy FitIns / FitRes shape the mod
  expects, so the ClientApp's train handler stays one function.

Evaluation counts go the same way, in a second SecAgg+ pass after each round's training
(`PURPOSE` = "evaluate" in the instruction's config): each site masks its per-class counts and
summed loss (medtune.federation.wire.counts_vector, scaled by 1 / `COUNTS_SCALE`) with weight 1,
and the coordinator learns only the federation's totals, all that accuracy and macro-F1 need.

What still crosses in clear, per hospital, in a secure round: its name and status, and the
ledger's epsilon, delta and steps (the coordinator's record of each ledger,
medtune/ledger_record.py, needs them). Every private or legacy name used is listed in `LEGACY_NAMES`
and checked by a test.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, cast

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import recorddict_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from medtune.errors import PrivacyTermsError, SecureAggregationError, StateError
from medtune.federation.wire import hospital_of, scalar
from medtune.state import EXCHANGED_NAMES

if TYPE_CHECKING:
    from flwr.app import ConfigRecordValues, ConfigScalar

log = logging.getLogger("medtune.secure_aggregation")

# Every legacy or private Flower name this module relies on (tests/test_secure_aggregation.py checks
# them).
LEGACY_NAMES = (
    ("flwr.server.workflow", "SecAggPlusWorkflow"),
    ("flwr.common.serde", "recorddict_to_proto"),
    ("flwr.server.compat.legacy_context", "LegacyContext"),
    ("flwr.server.compat.grid_client_proxy", "GridClientProxy"),
    ("flwr.server.strategy", "Strategy.configure_fit"),
    ("flwr.server.strategy", "Strategy.aggregate_fit"),
    ("flwr.server.workflow.constant", "MAIN_CONFIGS_RECORD"),
    ("flwr.server.workflow.constant", "MAIN_PARAMS_RECORD"),
    ("flwr.server.workflow.constant", "Key.CURRENT_ROUND"),
    ("flwr.client.mod", "secaggplus_mod"),
    ("flwr.compat.common.recorddict_compat", "recorddict_to_fitins"),
    ("flwr.compat.common.recorddict_compat", "fitres_to_recorddict"),
    ("flwr.common.secure_aggregation.secaggplus_constants", "RECORD_KEY_CONFIGS"),
    ("flwr.common.secure_aggregation.secaggplus_constants", "Key.STAGE"),
    ("flwr.common.secure_aggregation.secaggplus_constants", "Key.SAMPLE_NUMBER"),
    ("flwr.common.secure_aggregation.secaggplus_constants", "Key.SHARE_NUMBER"),
    ("flwr.common.secure_aggregation.secaggplus_constants", "Key.THRESHOLD"),
    ("flwr.common.secure_aggregation.secaggplus_constants", "Key.CLIPPING_RANGE"),
    ("flwr.common.secure_aggregation.secaggplus_constants", "Key.TARGET_RANGE"),
    ("flwr.common.secure_aggregation.secaggplus_constants", "Key.MOD_RANGE"),
    ("flwr.common.secure_aggregation.secaggplus_constants", "Key.MAX_WEIGHT"),
    ("flwr.common.secure_aggregation.secaggplus_constants", "Stage.SETUP"),
    ("flwr.common.secure_aggregation.secaggplus_constants", "Stage.COLLECT_MASKED_VECTORS"),
)

# The fixed-point grid. Each weighted value is clipped to +-CLIPPING_RANGE and mapped onto
# QUANTIZATION_RANGE integers; MODULUS_RANGE must hold the sum of every hospital's integers, so
# at most MODULUS_RANGE / QUANTIZATION_RANGE = 256 hospitals a round.
CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 2**24
MODULUS_RANGE = 2**32
MAX_HOSPITALS = MODULUS_RANGE // QUANTIZATION_RANGE
# in a secure instruction's config: "train", or "evaluate" (sum the test counts)
PURPOSE = "secure-purpose"
COUNTS = "counts"  # the one array of a secure evaluation: per-class counts and the summed loss
# in an evaluation instruction's config: counts are divided by it before masking
COUNTS_SCALE = "counts-scale"
# the setup a site accepted, kept in its Context for the collect stage
SETTINGS_KEY = "medtune.secure-aggregation"
FITINS_ARRAYS = "fitins.parameters"
FITRES_EXAMPLES = "fitres.num_examples"


@dataclass(frozen=True)
class SecureRound:
    """What the coordinator learns from one secure round: the weighted mean (None if the round could
    not complete), each contributing node's clear report, and how many nodes dropped out."""

    mean: dict[str, np.ndarray] | None
    reports: dict[int, dict[str, ConfigScalar]]  # the FitRes metrics each node sent in clear
    dropped: int
    bytes_down: dict[int, int] = field(default_factory=dict)  # per node, every stage of the pass
    bytes_up: dict[int, int] = field(default_factory=dict)


def content_bytes(content: RecordDict) -> int:
    """The bytes a message's records take on the wire, as Flower serialises them (SecAgg+'s configs
    hold lists, which ConfigRecord.count_bytes refuses)."""
    return recorddict_to_proto(content).ByteSize()


class _CountingGrid:
    """The grid the workflow talks through, counting each node's bytes both ways over every SecAgg+
    stage."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.down: Counter[int] = Counter()
        self.up: Counter[int] = Counter()

    def __getattr__(self, name: str) -> object:
        return getattr(self.grid, name)

    def send_and_receive(self, messages, timeout=None):  # noqa: ANN001, ANN201 - Grid's signature
        messages = list(messages)
        for message in messages:
            self.down[message.metadata.dst_node_id] += content_bytes(message.content)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if not reply.has_error():
                self.up[reply.metadata.src_node_id] += content_bytes(reply.content)
        return replies


class _Instructions(Strategy):
    """The legacy Strategy the workflow drives: each node gets its own instruction, and the mean is
    kept."""

    def __init__(
        self,
        grid: Grid,
        instructions: dict[int, tuple[dict[str, np.ndarray], dict[str, ConfigRecordValues]]],
        names: tuple[str, ...],
    ) -> None:
        self.grid = grid
        self.instructions = instructions
        self.names = names  # the arrays the sites send back, in order
        self.result = SecureRound(mean=None, reports={}, dropped=len(instructions))

    def initialize_parameters(self, client_manager):  # noqa: ANN001, ANN201 - legacy signature
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        return [
            (
                GridClientProxy(node, self.grid, 0),
                FitIns(ndarrays_to_parameters(_ordered(arrays, EXCHANGED_NAMES)), dict(config)),
            )
            for node, (arrays, config) in self.instructions.items()
        ]

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201
        if results:  # every result carries the same unmasked mean
            mean = dict(
                zip(self.names, parameters_to_ndarrays(results[0][1].parameters), strict=True)
            )
            reports = {proxy.node_id: dict(fitres.metrics) for proxy, fitres in results}
            self.result = SecureRound(
                mean=mean, reports=reports, dropped=len(self.instructions) - len(results)
            )
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001, ANN201
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: ANN001, ANN201
        return None


def _ordered(arrays: dict[str, np.ndarray], names: tuple[str, ...]) -> list[np.ndarray]:
    return [np.asarray(arrays[name]) for name in names]


def threshold_for(hospitals: int) -> int:
    """Shares needed to unmask: more than half, so no coordinator can ask one half for a hospital's
    private-mask shares and the other half for its pairwise-mask shares."""
    return hospitals // 2 + 1


def secure_mean(
    grid: Grid,
    server_round: int,
    instructions: dict[int, tuple[dict[str, np.ndarray], dict[str, ConfigRecordValues]]],
    max_weight: int,
    timeout: float,
    names: tuple[str, ...] = EXCHANGED_NAMES,
) -> SecureRound:
    """Run one SecAgg+ pass over `instructions` (node -> global arrays and config); the unmasked
    weighted mean of the arrays `names` the sites send back.

    A hospital that drops out before sending its masked vector is left out of the mean; with fewer
    than the threshold left, the pass yields no mean and nothing half-aggregated is kept.
    """
    hospitals = len(instructions)
    if not 3 <= hospitals <= MAX_HOSPITALS:
        raise StateError(
            f"secure aggregation needs 3 to {MAX_HOSPITALS} hospitals in a round, got {hospitals}"
        )
    counting = _CountingGrid(grid)
    # Flower types the workflow's grid as the Grid ABC; the wrapper answers every Grid call by
    # delegation.
    counted = cast(Grid, counting)
    strategy = _Instructions(counted, instructions, names)
    state = RecordDict(
        {
            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
            MAIN_PARAMS_RECORD: ArrayRecord(),
        }
    )
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}), strategy=strategy
    )
    workflow = SecAggPlusWorkflow(
        num_shares=hospitals,
        reconstruction_threshold=threshold_for(hospitals),
        max_weight=float(max_weight),
        clipping_range=CLIPPING_RANGE,
        quantization_range=QUANTIZATION_RANGE,
        modulus_range=MODULUS_RANGE,
        timeout=timeout,
    )
    workflow(counted, context)
    return replace(strategy.result, bytes_down=dict(counting.down), bytes_up=dict(counting.up))


# --- the site's side ------------------------------------------------------------------------------


def is_secure(message: Message) -> bool:
    """Whether a train message is SecAgg+'s collect stage (legacy FitIns shape), not a plain
    round."""
    return FITINS_ARRAYS in message.content.array_records


def secure_instruction(message: Message) -> tuple[dict[str, np.ndarray], ConfigRecord]:
    """The global state and config of a collect-stage message."""
    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(EXCHANGED_NAMES):
        raise StateError(
            f"secure round: {len(arrays)} arrays sent, expected {len(EXCHANGED_NAMES)} "
            f"{EXCHANGED_NAMES}"
        )
    return dict(zip(EXCHANGED_NAMES, arrays, strict=True)), ConfigRecord(dict(fitins.config))


@dataclass(frozen=True)
class SecureLimits:
    """The setup a site accepted: the largest weight and value its masked vector may carry
    unclipped."""

    max_weight: float
    clipping_range: float

    @classmethod
    def of(cls, context: Context) -> "SecureLimits":
        if SETTINGS_KEY not in context.state.config_records:
            raise StateError(
                "secure round: the collect stage came before this site accepted a setup"
            )
        accepted = context.state.config_records[SETTINGS_KEY]
        return cls(
            max_weight=float(scalar(accepted["max-weight"])),
            clipping_range=float(scalar(accepted["clipping-range"])),
        )

    def check(self, arrays: dict[str, np.ndarray], examples: int) -> None:
        """Refuse an update SecAgg+ would distort: a weight above max-weight overflows, a value past
        the range clips."""
        if examples > self.max_weight:
            raise SecureAggregationError(
                f"secure round: this site trains on {examples} records, more than "
                f"secagg-max-weight={self.max_weight:g}; the coordinator must raise "
                "secagg-max-weight"
            )
        largest = max(float(np.max(np.abs(array))) for array in arrays.values())
        if largest * examples / self.max_weight > self.clipping_range:
            raise SecureAggregationError(
                f"secure round: a weighted value of this site's update ({largest:.3g} x {examples}/"
                f"{self.max_weight:g}) is past SecAgg+'s clipping range {self.clipping_range:g}: "
                "it would be clipped"
            )


def secure_reply(
    arrays: dict[str, np.ndarray],
    names: tuple[str, ...],
    examples: int,
    report: Mapping[str, ConfigScalar],
) -> RecordDict:
    """A collect-stage reply in the FitRes shape `secaggplus_mod` masks (arrays in the order of
    `names`, as the coordinator reads them back); `report` is what crosses in clear."""
    parameters = ndarrays_to_parameters(_ordered(arrays, names))
    fitres = FitRes(Status(Code.OK, ""), parameters, int(examples), dict(report))
    return compat.fitres_to_recorddict(fitres, keep_input=False)


def _check_setup(configs: ConfigRecord) -> None:
    """Refuse SecAgg+ parameters under which the masking would not hide this site, or the sum could
    wrap."""
    hospitals, shares, threshold = (
        int(scalar(configs[key])) for key in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD)
    )
    target, modulus = int(scalar(configs[Key.TARGET_RANGE])), int(scalar(configs[Key.MOD_RANGE]))
    problems = []
    if hospitals < 3:
        problems.append(
            f"{hospitals} hospitals (at least 3 are needed to hide one among the others)"
        )
    if threshold <= shares // 2:
        problems.append(f"threshold {threshold} of {shares} shares (more than half are needed)")
    if hospitals * target > modulus:
        problems.append(
            f"{hospitals} x quantisation range {target} exceeds the modulus {modulus} (the sum "
            "could wrap)"
        )
    if problems:
        raise PrivacyTermsError("secure aggregation setup refused: " + "; ".join(problems))


def site_mod(
    refusal: Callable[[Exception], str],
) -> Callable[[Message, Context, Callable], Message]:
    """The site's SecAgg+ mod; `refusal` turns any error into the fixed category that may leave the
    site."""

    def mod(
        message: Message, context: Context, call_next: Callable[[Message, Context], Message]
    ) -> Message:
        configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
        if message.metadata.message_type != MessageType.TRAIN or configs is None:
            return call_next(message, context)  # a plain round, a query or an evaluation
        stage = configs.get(Key.STAGE)
        try:
            if stage == Stage.SETUP:
                _check_setup(configs)
                context.state.config_records[SETTINGS_KEY] = ConfigRecord(
                    {
                        "max-weight": float(scalar(configs[Key.MAX_WEIGHT])),
                        "clipping-range": float(scalar(configs[Key.CLIPPING_RANGE])),
                    }
                )
            reply = secaggplus_mod(message, context, _masked_only(call_next))
        # the handler refused: its category is the reason the site drops out
        except _NotMasked as dropped:
            return Message(
                Error(code=0, reason=hospital_of(dropped.reply, "")[2]), reply_to=message
            )
        # the site drops out with a category; the details stay in its log
        except Exception as error:  # noqa: BLE001
            log.error("secure aggregation stage %s: %s: %s", stage, type(error).__name__, error)
            return Message(Error(code=0, reason=refusal(error)), reply_to=message)
        # the count already travels inside the masked vector
        if stage == Stage.COLLECT_MASKED_VECTORS:
            reply.content.metric_records[FITRES_EXAMPLES] = MetricRecord({"num_examples": 0})
        return reply

    return mod


class _NotMasked(Exception):
    """The train handler answered with a refusal, not an update: the site drops out of the round."""

    def __init__(self, reply: Message) -> None:
        super().__init__("no update to mask")
        self.reply = reply


def _masked_only(
    call_next: Callable[[Message, Context], Message],
) -> Callable[[Message, Context], Message]:
    def handler(message: Message, context: Context) -> Message:
        reply = call_next(message, context)
        if reply.has_error() or FITRES_EXAMPLES not in reply.content.metric_records:
            raise _NotMasked(reply)
        return reply

    return handler
