"""A client's own state on its disk: personal adapter, kept LoRA parts, privacy ledger.

Flower keeps ``context.state`` in the SuperNode's memory, so a restarted device would
lose its personal adapter and, worse, restart its epsilon at zero. `node_state_mod`
loads fedlora's part of the state from the node's state folder before every message and
writes it back (atomically) after, so a node that crashes or is restarted rejoins with
its personal adapter and privacy ledger intact.

The folder is the node config's ``state-dir`` (a deployed device, set by ``fedlora
client``), else the run config's ``client-state-dir`` (``fedlora simulate`` points it
into the run directory); with neither, state stays in memory as Flower keeps it. Each
federation (model, adapter shape, data, strategy, seed) has its own subfolder, so a
device taking part in several federations keeps them apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import serde
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedlora.config import keys_where
from fedlora.core import keys
from fedlora.core.errors import FedloraError

__all__ = [
    "STATE_PREFIX",
    "load_state",
    "node_state_mod",
    "other_records",
    "read_state",
    "save_state",
    "state_path",
]

log = logging.getLogger(__name__)

# Only fedlora's own records are kept on disk (Flower's mods keep per-round protocol state).
STATE_PREFIX = keys.STATE_PREFIX
# Run-config keys that make two runs the same federation for a client's state.
_IDENTITY = tuple(sorted(keys_where("identity")))


def state_path(context: Context) -> Path | None:
    """The file holding this client's state, or None when state stays in memory."""
    node, run = context.node_config, context.run_config
    # A deployed device (its own data-dir) keeps state only where its owner said: a server's
    # run config does not choose folders on it.
    device = bool(node.get(keys.NODE_DATA_DIR))
    root = str(node.get(keys.NODE_STATE_DIR) or ("" if device else run.get("client-state-dir")) or "")
    if not root:
        return None
    identity = {
        "run": {k: run.get(k) for k in _IDENTITY},
        "node": {k: node.get(k) for k in keys.NODE_IDENTITY},
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    client = int(node.get(keys.NODE_PARTITION_ID, 0))
    return Path(root).expanduser() / f"federation-{digest}" / f"client-{client}.state"


def other_records(context: Context, name: str) -> list[ConfigRecord]:
    """The ConfigRecords ``name`` of this client's other federations in the node's state folder.

    A device's lifetime privacy (`fedlora.client.policy`) reads every ledger it has kept:
    this client's files (same partition) in every federation subfolder but this one.

    Raises
    ------
    FedloraError
        If one of those files cannot be read as a saved state.

    """
    path = state_path(context)
    if path is None:
        return []
    found = []
    for other in sorted(path.parent.parent.glob(f"federation-*/{path.name}")):
        if other != path:
            record = read_state(other).config_records.get(name)
            if record is not None:
                found.append(record)
    return found


def load_state(context: Context, path: Path) -> None:
    """Put the records saved at ``path`` (if any) into ``context.state``.

    Raises
    ------
    FedloraError
        If the file exists but cannot be read as a saved state.

    """
    if not path.exists():
        return
    for name, record in read_state(path).items():
        context.state[name] = record


def read_state(path: Path) -> RecordDict:
    """The records saved at ``path``.

    Raises
    ------
    FedloraError
        If the file cannot be read as a saved state.

    """
    proto = ProtoRecordDict()
    try:
        proto.ParseFromString(Path(path).read_bytes())
        saved = serde.recorddict_from_proto(proto)
    except Exception as err:  # protobuf raises DecodeError and friends
        # The path stays in the node's log: the error reply says only "state-dir".
        raise FedloraError(
            f"state-dir: {str(path)!r} is not a fedlora client state ({type(err).__name__}); "
            "it was left as it is: move it away to start this client afresh",
            where="state-dir",
        ) from None
    return saved


def save_state(context: Context, path: Path) -> None:
    """Write fedlora's records of ``context.state`` to ``path``, atomically.

    The file is readable by its owner only (0600), in a folder only its owner can list
    (0700): it holds the personal adapter and the privacy ledger.
    """
    own = RecordDict({n: r for n, r in context.state.items() if n.startswith(STATE_PREFIX)})
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(serde.recorddict_to_proto(own).SerializeToString())
    tmp.replace(path)


def node_state_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: load the client's saved state before the handler, save it after.

    Between messages the state is only on disk (not in ``context.state``), so that memory
    does not grow with the number of clients a simulation has seen.
    """
    path = state_path(context)
    if path is None:
        return call_next(message, context)
    try:
        load_state(context, path)
    except FedloraError as err:
        log.error("fedlora client: %s", err)
        return Message(Error(code=keys.E_STATE, reason=err.public()), reply_to=message)
    reply = call_next(message, context)
    # Also after an error reply: declining a round for the privacy budget is remembered. A run
    # the device's policy refused leaves no trace on its disk.
    refused = reply.has_error() and reply.error.code == keys.E_POLICY
    if not refused:
        save_state(context, path)
    # The disk holds it now: a simulation of many clients keeps none of it in memory.
    for name in [n for n in context.state if n.startswith(STATE_PREFIX)]:
        del context.state[name]
    return reply
