"""The server's checkpoint after every round, and resuming a run from it.

A checkpoint holds everything the server needs to go on as if it had never stopped:
the global arrays, the strategy object itself (FedAdam/FedYogi moments, FedAvgM
momentum, the client-level DP accountant), the round number and the results so far.
Clients keep their own state (personal adapter, privacy ledger) on their disks
(`fedlora.client.state`). The strategy is pickled: load only checkpoints you wrote.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.serverapp.strategy import Strategy

from fedlora.config import keys_where
from fedlora.core.errors import ConfigError
from fedlora.core.rundir import CHECKPOINT, RoundRecord
from fedlora.lora.adapters import AdapterState

__all__ = ["Checkpoint", "load_checkpoint", "save_checkpoint"]

_FILE = "server.pkl"
# Keys a resumed run may change: how long and how patiently it runs, not what it computes.
_MAY_CHANGE = keys_where("resumable")


@dataclass
class Checkpoint:
    """The server's state after ``round``."""

    round: int
    arrays: AdapterState
    strategy: Strategy
    rounds: dict[int, RoundRecord]
    config: dict[str, Any]
    wall_s: float


class _Pickler(pickle.Pickler):
    # Flower's DP accountant keeps references to modules: store them by name.
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.ModuleType):
            return importlib.import_module, (obj.__name__,)
        return NotImplemented


def save_checkpoint(out_dir: Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` into ``out_dir/checkpoint/``, replacing the previous one atomically."""
    folder = out_dir / CHECKPOINT
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(checkpoint)
    tmp = folder / f".{_FILE}.{os.getpid()}.tmp"
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(folder / _FILE)


def load_checkpoint(out_dir: Path, config: dict[str, Any]) -> Checkpoint:
    """The last checkpoint in ``out_dir``, checked against the resumed run's ``config``.

    Raises
    ------
    ConfigError
        If there is no readable checkpoint, or the run config differs in a key that
        changes what the run computes.

    """
    path = out_dir / CHECKPOINT / _FILE
    if not path.is_file():
        raise ConfigError(f"resume: {out_dir} has no checkpoint ({CHECKPOINT}/{_FILE}) to resume from")
    try:
        checkpoint = pickle.loads(path.read_bytes())  # only the server's own checkpoint file is read
    except Exception as err:
        raise ConfigError(f"resume: {path} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(checkpoint, Checkpoint):
        raise ConfigError(f"resume: {path} is not a fedlora checkpoint")
    for key in sorted(set(config) | set(checkpoint.config)):
        if key in _MAY_CHANGE:
            continue
        if config.get(key) != checkpoint.config.get(key):
            was = checkpoint.config.get(key)
            raise ConfigError(
                f"{key}: the resumed run has {config.get(key)!r}, its checkpoint {was!r}; "
                f"a resumed run may only change {', '.join(sorted(_MAY_CHANGE - {'resume'}))}"
            )
    return checkpoint
