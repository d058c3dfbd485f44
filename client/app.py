"""The hospital's Flower ClientApp: a short function from a message to a reply.

Simulation and deployment share this code. Only where the records and the ledger come from
differs (client.node_config): a simulated hospital takes its partition of the scenario's data and
keeps its ledger under the run's out directory; a deployed hospital reads its own file and
ledger path from the SuperNode's node config.

A hospital that cannot take part (its data file is refused, its ledger is corrupted, its node
config is incomplete, or anything unforeseen fails) replies `failed` instead of raising, with the
error's category only (the message, which may quote records or site paths, stays
in the site's log): the server records it
and the federation goes on with the others. The site is built again next
round, so a hospital that fixes its file rejoins without a restart.

With secure aggregation (medtune/federation/secure_aggregation.py) the train handler answers
SecAgg+'s collect stage: the site checks its own update, as the coordinator can no longer, and the
mod masks it; a site that cannot send an update drops out of the round with its category.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from client.node_config import PARTITION_ID, check_evaluation_shared, check_sent_in_clear, site_for
from medtune.errors import MedTuneError, StateError
from medtune.federation.secure_aggregation import (
    COUNTS,
    COUNTS_SCALE,
    PURPOSE,
    SecureLimits,
    is_secure,
    secure_instruction,
    secure_reply,
    site_mod,
)
from medtune.federation.wire import (
    ARRAYS,
    TrainReport,
    clear_report,
    counts_vector,
    evaluate_reply,
    failed_reply,
    failure_reason,
    from_record,
    ready_reply,
    record_from_wire,
    scalar,
    train_reply,
)
from medtune.hospitals import hospital_name
from medtune.logs import quiet_libraries
from medtune.site import Instruction, RoundOutcome, Site
from medtune.state import EXCHANGED_NAMES, update_norm

quiet_libraries()
log = logging.getLogger("medtune.site")


def refusal(error: Exception) -> str:
    """The category a site's secure-aggregation error leaves as (the full error stays in its
    log)."""
    return failure_reason(error if isinstance(error, MedTuneError) else MedTuneError(str(error)))


app = ClientApp(mods=[site_mod(refusal)])


def failed(message: Message, context: Context, error: Exception) -> Message:
    """The full error stays in this site's log; the reply carries only its category
    (medtune.federation.wire).

    An error MedTune did not foresee (an OSError from the site's disk, a bug) is logged with its
    traceback and leaves the site as the category "site error": its text may name site paths.
    """
    hospital = hospital_label(context)
    if isinstance(error, MedTuneError):
        log.error("%s cannot take part: %s", hospital, error)
    else:
        log.error(
            "%s cannot take part: unexpected %s", hospital, type(error).__name__, exc_info=error
        )
        error = MedTuneError(f"{type(error).__name__}: {error}")
    return Message(failed_reply(hospital, error), reply_to=message)


def hospital_label(context: Context) -> str:
    """This node's hospital name, known even when its site cannot be built."""
    node_config = context.node_config
    if node_config.get("hospital"):
        return str(node_config["hospital"])
    if PARTITION_ID in node_config:
        return hospital_name(int(node_config[PARTITION_ID]))
    return f"node {context.node_id}"


def report_of(outcome: RoundOutcome) -> TrainReport:
    """The round as plain numbers for the wire: the ledger's totals, and the arrays if it
    trained."""
    return TrainReport(
        arrays=outcome.arrays,
        examples=outcome.examples,
        epsilon=outcome.ledger.epsilon,
        delta=outcome.ledger.config.delta,
        steps=outcome.ledger.steps,
    )


def instruction_of(
    arrays: dict[str, np.ndarray], config: ConfigRecord, context: Context
) -> Instruction:
    """A query or train message's content as the site reads it: the global state, the round, the
    ledger record."""
    return Instruction(
        arrays=arrays,
        server_round=int(scalar(config["server-round"])),
        proximal_mu=float(scalar(config.get("proximal-mu", 0.0))),
        record=record_from_wire(config),
        node=int(context.node_id),
    )


def plain_instruction(message: Message, context: Context) -> Instruction:
    content = message.content
    return instruction_of(
        from_record(content.array_records[ARRAYS]), content.config_records["config"], context
    )


@app.query()
def query(message: Message, context: Context) -> Message:
    """ "Can you take part in this round?", answered before anyone spends: nothing is trained or
    written."""
    try:
        site = site_for(context)
        # a plain run: would this site send in clear?
        if not site.settings.federation.secure_aggregation:
            check_sent_in_clear(context)
        ready = site.can_take_part(plain_instruction(message, context))
    except Exception as error:  # noqa: BLE001 - every failure leaves the site as a category only
        return failed(message, context, error)
    return Message(ready_reply(site.name, ready), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """A plain round sends the update in clear; a secure round (SecAgg+'s collect stage) hands it
    to the site's mod to be masked, after the site checked it as the coordinator no longer can."""
    if is_secure(message):
        return secure_answer(message, context)
    try:
        site = site_for(context)
        check_sent_in_clear(context)
        instruction = plain_instruction(message, context)
        outcome = site.train_round(instruction)
    except Exception as error:  # noqa: BLE001 - every failure leaves the site as a category only
        return failed(message, context, error)
    log_outcome(site, instruction, outcome)
    return Message(train_reply(report_of(outcome), site.name), reply_to=message)


def secure_answer(message: Message, context: Context) -> Message:
    """SecAgg+'s collect stage: this site's update, or its test counts, checked and handed to the
    mod to mask."""
    try:
        site = site_for(context)
        arrays, config = secure_instruction(message)
        limits = SecureLimits.of(context)
        if config.get(PURPOSE) == "evaluate":
            check_evaluation_shared(context)
            evaluation = site.evaluate(arrays, int(scalar(config["server-round"])))
            log.info(
                "%s: round %s, own test split: accuracy %.3f, macro-F1 %.3f (%d records; only the "
                "federation's totals leave the site)",
                site.name,
                config.get("server-round"),
                evaluation.accuracy,
                evaluation.macro_f1,
                evaluation.examples,
            )
            counts = {COUNTS: counts_vector(evaluation) / float(scalar(config[COUNTS_SCALE]))}
            limits.check(counts, 1)
            return Message(
                secure_reply(counts, (COUNTS,), 1, {"hospital": site.name, "status": "evaluated"}),
                reply_to=message,
            )
        instruction = instruction_of(arrays, config, context)
        outcome = site.train_round(instruction)
        if outcome.arrays is not None:  # it trained
            check_own_update(site, instruction, outcome.arrays)
            limits.check(outcome.arrays, outcome.examples)
    except Exception as error:  # noqa: BLE001 - every failure leaves the site as a category only
        return failed(message, context, error)
    log_outcome(site, instruction, outcome)
    if outcome.arrays is None:  # it did not train
        # the mod drops the site
        return Message(train_reply(report_of(outcome), site.name), reply_to=message)
    report = clear_report(report_of(outcome), site.name)
    return Message(
        secure_reply(outcome.arrays, EXCHANGED_NAMES, outcome.examples, report), reply_to=message
    )


def log_outcome(site: Site, instruction: Instruction, outcome: RoundOutcome) -> None:
    # the ledger's numbers stay in the site's log; the reply says only "stopped"
    if not outcome.trained:
        log.info("%s stops: %s", site.name, outcome.stop_reason)
    elif outcome.resent:
        log.info(
            "%s: round %s was trained from this global state before; its update is sent again, no "
            "new step",
            site.name,
            instruction.server_round,
        )


def check_own_update(site: Site, instruction: Instruction, arrays: dict[str, np.ndarray]) -> None:
    """The checks the coordinator makes on a plain update (`arrays`), made by the site itself
    before masking."""
    federation = site.settings.federation
    site.spec.check(arrays, source=f"{site.name}'s own update")
    norm = update_norm(arrays, instruction.arrays)
    if not norm <= federation.max_update_norm:
        raise StateError(
            f"{site.name}'s own update moved the global state by L2 norm {norm:.4g}, more than "
            f"max-update-norm={federation.max_update_norm:g}: it is not sent"
        )


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    try:
        check_evaluation_shared(context)
        site = site_for(context)
        content = message.content
        arrays = from_record(content.array_records[ARRAYS])
        evaluation = site.evaluate(
            arrays, int(scalar(content.config_records["config"]["server-round"]))
        )
    except Exception as error:  # noqa: BLE001 - every failure leaves the site as a category only
        return failed(message, context, error)
    return Message(evaluate_reply(evaluation, site.name), reply_to=message)
