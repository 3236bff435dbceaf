"""Flower ClientApp: the entry point; each handler hands its message to `fedlora.client.round`.

What a client sends is built only by `fedlora.lora.adapters.to_record` (the shared
adapter) and scalar MetricRecords; personal state stays in ``context.state``, kept on the
node's disk between messages by `fedlora.client.state.node_state_mod`.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlora.client.messages import reply_errors
from fedlora.client.state import node_state_mod
from fedlora.core import keys
from fedlora.privacy.mods import privacy_mod
from fedlora.privacy.wire import wire_log_mod

__all__ = ["app"]

# Outermost mod: the wire log sees each reply exactly as it leaves (after SecAgg+ masking);
# then the node's state is loaded from and saved to its disk around every message.
app = ClientApp(mods=[wire_log_mod, node_state_mod])


@app.train(mods=[privacy_mod])
@reply_errors
def train(message: Message, context: Context) -> Message:
    """Train the shared adapter; reply with the parts the strategy shares."""
    from fedlora.client import recipe  # noqa: PLC0415 - heavy: torch, transformers (Flower imports this module early)

    return recipe.train(message, context)


@app.evaluate()
@reply_errors
def evaluate(message: Message, context: Context) -> Message:
    """Update the personal state, then evaluate the global and personalized models."""
    from fedlora.client import recipe  # noqa: PLC0415 - heavy: torch, transformers

    return recipe.evaluate(message, context)


@app.train(keys.LOCAL_ONLY_ACTION)
@reply_errors
def train_local_only(message: Message, context: Context) -> Message:
    """Baseline: an adapter trained on this client's data alone."""
    from fedlora.client import recipe  # noqa: PLC0415 - heavy: torch, transformers

    return recipe.local_only(message, context)
