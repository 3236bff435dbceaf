"""The client's side of the wire: reading the server's message and building replies.

A Message-API message carries the global arrays and config in named records; under secure
aggregation Flower's SecAgg+ workflow sends legacy FitIns/EvaluateIns instead, and expects
FitRes/EvaluateRes back. Errors a client raises on purpose become error replies.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict

from fedlora.client.policy import PolicyRefused
from fedlora.core import keys
from fedlora.core.errors import BudgetExhausted, FedloraError
from fedlora.lora.adapters import from_record

if TYPE_CHECKING:
    from fedlora.lora.adapters import AdapterState
import flwr.compat.common.recorddict_compat as compat
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

__all__ = ["Handler", "Incoming", "legacy_reply", "reply", "reply_errors"]

log = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]


# Error replies' codes by kind of error; any other FedloraError is bad local input.
_CODES: tuple[tuple[type[FedloraError], int], ...] = (
    (BudgetExhausted, keys.E_BUDGET_EXHAUSTED),
    (PolicyRefused, keys.E_POLICY),
)


def reply_errors(handler: Handler) -> Handler:
    """Turn a FedloraError into an error reply, so the node lives on.

    The reply carries the error's code, kind and field or line (`FedloraError.public`);
    the whole message, which may name local paths, texts or labels, stays in the node's log.
    A run the device's own policy refuses (`fedlora.client.policy`) gets ``E_POLICY``.
    """

    @functools.wraps(handler)
    def wrapped(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except FedloraError as err:
            client = context.node_config.get(keys.NODE_PARTITION_ID, "?")
            if isinstance(err, PolicyRefused):
                log.error(
                    "fedlora client %s: refused run %s: %s; nothing of it ran", client, context.run_id, err
                )
            else:
                log.error("fedlora client %s: %s", client, err)
            code = next((c for kind, c in _CODES if isinstance(err, kind)), keys.E_CLIENT_INPUT)
            return Message(Error(code=code, reason=err.public()), reply_to=message)

    return wrapped


# Legacy records: under secure aggregation Flower's SecAgg+ workflow sends FitIns/EvaluateIns.
_LEGACY_FIT, _LEGACY_EVALUATE = "fitins.parameters", "evaluateins.parameters"


class Incoming:
    """The server's arrays and config, from a Message-API or a legacy (SecAgg+) message."""

    def __init__(self, message: Message, names: list[str]) -> None:
        content = message.content
        self.legacy = _LEGACY_FIT in content.array_records or _LEGACY_EVALUATE in content.array_records
        if self.legacy:
            ins = (
                compat.recorddict_to_fitins(content, keep_input=True)
                if _LEGACY_FIT in content.array_records
                else compat.recorddict_to_evaluateins(content, keep_input=True)
            )
            arrays = parameters_to_ndarrays(ins.parameters)
            if len(arrays) != len(names):
                raise FedloraError(f"message: {len(arrays)} arrays from the server, expected {len(names)}")
            self.arrays: ArrayRecord | None = ArrayRecord(
                {n: Array(a) for n, a in zip(names, arrays, strict=True)}
            )
            self.config: Mapping[str, object] = dict(ins.config)
            return
        self.arrays = content.array_records.get(keys.ARRAYS)
        self.config = content.config_records.get(keys.CONFIG) or {}

    def adapter(self) -> AdapterState:
        """The server's arrays, by name."""
        if self.arrays is None:
            raise FedloraError(f"message: no {keys.ARRAYS!r} ArrayRecord in the server's message")
        return from_record(self.arrays)

    def int(self, key: str) -> int:
        """The integer config value ``key`` of the server's message."""
        value = self.config.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise FedloraError(f"message: config {key!r} must be an integer, got {value!r}")
        return value

    def float(self, key: str) -> float:
        """The numeric config value ``key`` of the server's message."""
        value = self.config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise FedloraError(f"message: config {key!r} must be a number, got {value!r}")
        return float(value)


def reply(message: Message, metrics: Mapping[str, float | int], arrays: ArrayRecord | None = None) -> Message:
    """A Message-API reply: the scalar metrics and, for training, the uploaded arrays."""
    content = RecordDict({keys.METRICS: MetricRecord(dict(metrics))})
    if arrays is not None:
        content[keys.ARRAYS] = arrays
    return Message(content=content, reply_to=message)


def legacy_reply(
    message: Message, metrics: Mapping[str, float | int], arrays: ArrayRecord | None = None, loss: float = 0.0
) -> Message:
    """The reply SecAgg+ expects: FitRes (masked by ``secaggplus_mod`` on the way out) or EvaluateRes."""
    ok, num = Status(Code.OK, ""), int(metrics[keys.M_NUM_EXAMPLES])
    if arrays is not None:
        params = ndarrays_to_parameters(arrays.to_numpy_ndarrays())
        content = compat.fitres_to_recorddict(FitRes(ok, params, num, dict(metrics)), keep_input=True)
    else:
        content = compat.evaluateres_to_recorddict(EvaluateRes(ok, loss, num, dict(metrics)))
    return Message(content=content, reply_to=message)
