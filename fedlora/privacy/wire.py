"""Wire audit: a record of everything a client sends, and a check of it.

With ``audit-wire-log`` set to a file path, the outermost client mod appends one JSON line
per reply describing its content: every ArrayRecord's keys, dtypes and shapes, every
MetricRecord's keys and value types, every ConfigRecord's keys and value types (sizes
for bytes). Values themselves are never logged. `audit_wire_log` reads such a file back
and says whether every reply held only adapter tensors, scalar metrics and, under
secure aggregation, SecAgg+ protocol messages (public keys, encrypted key shares and
masked vectors as bytes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedlora.core import keys

__all__ = ["WireAudit", "audit_wire_log", "wire_log_mod"]

_KEY = "audit-wire-log"
# The ConfigRecord SecAgg+ replies carry (flwr.common.secure_aggregation.secaggplus_constants).
SECAGG_RECORD = "secaggplus_configs"


def _describe(value: Any) -> str:
    if isinstance(value, bytes):
        return f"bytes[{len(value)}]"
    if isinstance(value, list):
        return f"list[{len(value)}] of {sorted({_describe(v).split('[')[0] for v in value}) or ['-']}"
    return type(value).__name__


def describe(message: Message) -> dict[str, Any]:
    """The shape of a message's content, without any of its values."""
    content = message.content if message.has_content() else None
    if content is None:
        return {"type": message.metadata.message_type, "error": message.error.code}
    return {
        "type": message.metadata.message_type,
        "arrays": {
            name: {k: [a.dtype, list(a.shape)] for k, a in record.items()}
            for name, record in content.array_records.items()
        },
        "metrics": {
            name: {k: _describe(v) for k, v in record.items()}
            for name, record in content.metric_records.items()
        },
        "configs": {
            name: {k: _describe(v) for k, v in record.items()}
            for name, record in content.config_records.items()
        },
    }


def wire_log_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Append a description of the reply to the ``audit-wire-log`` file, if set.

    A deployed device (a node with its own ``data-dir``) takes the path from its own node
    config only: a server must not choose where a device writes.
    """
    reply = call_next(msg, ctxt)
    device = bool(ctxt.node_config.get(keys.NODE_DATA_DIR))
    source = ctxt.node_config if device else ctxt.run_config
    path = str(source.get(keys.NODE_WIRE_LOG if device else _KEY, "") or "")
    if path:
        line = json.dumps({"node": ctxt.node_id, **describe(reply)})
        # One short append per reply: safe for concurrent simulated clients on POSIX.
        with open(os.path.expanduser(path), "a") as fh:
            fh.write(line + "\n")
    return reply


@dataclass
class WireAudit:
    """What a wire log shows: replies by kind and anything beyond what fedlora should send."""

    replies: int = 0
    by_type: dict[str, int] = field(default_factory=dict)
    array_keys: set[str] = field(default_factory=set)
    secagg_replies: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Whether every reply held only what fedlora means to send."""
        return not self.violations


def audit_wire_log(path: str | Path, adapter_keys: Iterable[str]) -> WireAudit:
    """Check every logged reply against what may leave a client.

    Allowed: ArrayRecords whose keys are adapter tensors (``adapter_keys``, or the legacy
    positional names under secure aggregation), MetricRecords of int/float values,
    Flower's legacy FitRes/EvaluateRes scalars, and the SecAgg+ ConfigRecord.
    """
    allowed = set(adapter_keys)
    audit = WireAudit()
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        reply = json.loads(line)
        audit.replies += 1
        audit.by_type[reply["type"]] = audit.by_type.get(reply["type"], 0) + 1
        where = f"reply {number} (node {reply['node']}, {reply['type']})"
        for name, arrays in reply.get("arrays", {}).items():
            legacy = name.endswith(".parameters")
            audit.array_keys.update(arrays)
            unknown = [k for k in arrays if not (legacy and k.isdigit()) and k not in allowed]
            if unknown:
                audit.violations.append(f"{where}: array {unknown[0]!r} is not an adapter tensor")
        for name, metrics in reply.get("metrics", {}).items():
            odd = {k: t for k, t in metrics.items() if t not in ("int", "float")}
            if odd:
                audit.violations.append(f"{where}: metric record {name!r} holds non-scalars {odd}")
        for name, config in reply.get("configs", {}).items():
            if name == SECAGG_RECORD:
                audit.secagg_replies += 1
            elif name.endswith(".metrics") or name.endswith(".status"):
                odd = {k: t for k, t in config.items() if t not in ("int", "float", "str", "bool")}
                if odd:
                    audit.violations.append(f"{where}: {name!r} holds non-scalars {odd}")
            else:
                audit.violations.append(f"{where}: unexpected config record {name!r}")
    return audit
