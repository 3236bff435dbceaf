"""A ClientApp whose clients 1-5 each claim a bad weight (``num-examples``) for their upload.

Client 0 behaves. The claim is changed on the reply as it leaves the node, as a
malicious client would send it: 1e12 (to take the mean over), NaN, Inf, a negative
number, and zero.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fedlora import client_app
from fedlora.client.state import node_state_mod
from fedlora.core import keys

CLAIMS = {1: 1e12, 2: float("nan"), 3: float("inf"), 4: -3.0, 5: 0.0}


def claim_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(message, context)
    claim = CLAIMS.get(int(context.node_config["partition-id"]))
    if message.metadata.message_type != "train" or reply.has_error() or claim is None:
        return reply
    metrics = dict(reply.content.metric_records[keys.METRICS])
    metrics[keys.M_NUM_EXAMPLES] = claim
    reply.content[keys.METRICS] = MetricRecord(metrics)
    return reply


app = ClientApp(mods=[claim_mod, node_state_mod])
app.train()(client_app.train)
app.evaluate()(client_app.evaluate)
