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
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from medtune.errors import MedTuneError
from medtune.hospitals import hospital_name
from medtune.logs import quiet_libraries
from client.node_config import PARTITION_ID, check_evaluation_shared, site_for
from medtune.site import Instruction, RoundOutcome
from medtune.federation.wire import (
    ARRAYS, TrainReport, evaluate_reply, failed_reply, from_record, ready_reply, record_from_wire, train_reply,
)

quiet_libraries()
app = ClientApp()
log = logging.getLogger("medtune.site")


def failed(message: Message, context: Context, error: Exception) -> Message:
    """The full error stays in this site's log; the reply carries only its category (medtune.federation.wire).

    An error MedTune did not foresee (an OSError from the site's disk, a bug) is logged with its
    traceback and leaves the site as the category "site error": its text may name site paths.
    """
    hospital = hospital_label(context)
    if isinstance(error, MedTuneError):
        log.error("%s cannot take part: %s", hospital, error)
    else:
        log.error("%s cannot take part: unexpected %s", hospital, type(error).__name__, exc_info=error)
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
    """The round as plain numbers for the wire: the ledger's totals, and the arrays if it trained."""
    return TrainReport(
        arrays=outcome.arrays,
        examples=outcome.examples,
        epsilon=outcome.ledger.epsilon,
        delta=outcome.ledger.config.delta,
        steps=outcome.ledger.steps,
    )


def instruction_of(message: Message, context: Context) -> Instruction:
    """A query or train message as the site reads it: the global state, the round, the ledger record."""
    config = message.content["config"]
    return Instruction(
        arrays=from_record(message.content[ARRAYS]),
        server_round=int(config["server-round"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        record=record_from_wire(config),
        node=int(context.node_id),
    )


@app.query()
def query(message: Message, context: Context) -> Message:
    """"Can you take part in this round?", answered before anyone spends: nothing is trained or written."""
    try:
        site = site_for(context)
        ready = site.can_take_part(instruction_of(message, context))
    except Exception as error:  # noqa: BLE001 - every failure leaves the site as a category only
        return failed(message, context, error)
    return Message(ready_reply(site.name, ready), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    try:
        site = site_for(context)
        outcome = site.train_round(instruction_of(message, context))
    except Exception as error:  # noqa: BLE001 - every failure leaves the site as a category only
        return failed(message, context, error)
    if not outcome.trained:  # the ledger's numbers stay in the site's log; the reply says only "stopped"
        log.info("%s stops: %s", site.name, outcome.stop_reason)
    elif outcome.resent:
        log.info("%s: round %s was trained from this global state before; its update is sent again, no new step",
                 site.name, message.content["config"]["server-round"])
    return Message(train_reply(report_of(outcome), site.name), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    try:
        check_evaluation_shared(context)
        site = site_for(context)
        evaluation = site.evaluate(from_record(message.content[ARRAYS]))
    except Exception as error:  # noqa: BLE001 - every failure leaves the site as a category only
        return failed(message, context, error)
    return Message(evaluate_reply(evaluation, site.name), reply_to=message)
