"""Client mods that switch on when the server's message asks for them.

One ClientApp serves every run configuration, so the privacy mods Flower provides are
applied per message: ``fixedclipping_mod`` when the server sends a clipping norm
(client-level DP with client-side clipping), ``secaggplus_mod`` when the message carries
SecAgg+ stage configs. Other messages go straight to the handler.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

__all__ = ["privacy_mod"]


def _wants_clipping(msg: Message) -> bool:
    return any(KEY_CLIPPING_NORM in record for record in msg.content.config_records.values())


def _wants_secagg(msg: Message) -> bool:
    return RECORD_KEY_CONFIGS in msg.content.config_records


def privacy_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Apply Flower's clipping or SecAgg+ mod when this message asks for it."""
    if msg.has_content() and _wants_secagg(msg):
        return secaggplus_mod(msg, ctxt, call_next)
    if msg.has_content() and _wants_clipping(msg):
        return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)
