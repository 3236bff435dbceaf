"""A ClientApp whose clients 1-5 each corrupt their upload in one way (fault injection).

Client 0 behaves. The corruption happens after fedlora's handler, on the reply as it
leaves the node, as a buggy or malicious client would send it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fedlora import client_app
from fedlora.client.state import node_state_mod
from fedlora.core import keys

FAULTS = {1: "nan", 2: "missing", 3: "extra", 4: "rank", 5: "norm"}


def corrupt_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    reply = call_next(message, context)
    fault = FAULTS.get(int(context.node_config["partition-id"]))
    if message.metadata.message_type != "train" or reply.has_error() or fault is None:
        return reply
    state = {k: np.array(a.numpy(), copy=True) for k, a in reply.content[keys.ARRAYS].items()}
    first = next(k for k in state if "lora_A" in k)
    if fault == "nan":
        state[first].flat[0] = np.nan
    elif fault == "missing":
        del state[first]
    elif fault == "extra":
        state["classifier.extra.weight"] = np.zeros(3, np.float32)
    elif fault == "rank":
        state[first] = np.concatenate([state[first], state[first]])
    elif fault == "norm":
        state[first] += 1e3
    reply.content[keys.ARRAYS] = ArrayRecord({k: Array(v) for k, v in state.items()})
    return reply


app = ClientApp(mods=[corrupt_mod, node_state_mod])
app.train()(client_app.train)
app.evaluate()(client_app.evaluate)
