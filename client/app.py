"""The hospital's Flower ClientApp: a short function from a message to a reply.

Simulation and deployment share this code. Only where the records and the ledger come from
differs (medtune.site_source): a simulated hospital takes its partition of the scenario's data and
keeps its ledger under the run's out directory; a deployed hospital reads its own file and
ledger path from the SuperNode's node config.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from medtune.logs import quiet_libraries
from medtune.site_source import site_for
from medtune.wire import ARRAYS, evaluate_reply, from_record, train_reply

quiet_libraries()
app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    site = site_for(context)
    config = message.content["config"]
    outcome = site.train_round(
        from_record(message.content[ARRAYS]),
        server_round=int(config["server-round"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
    )
    return Message(train_reply(outcome, site.name), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    site = site_for(context)
    evaluation = site.evaluate(from_record(message.content[ARRAYS]))
    return Message(evaluate_reply(evaluation, site.name), reply_to=message)
