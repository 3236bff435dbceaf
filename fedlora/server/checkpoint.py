"""The server's checkpoint after every round, and resuming a run from it.

A checkpoint holds everything the server needs to go on as if it had never stopped:
the global arrays, the strategy's state (FedAdam/FedYogi moments, FedAvgM momentum, the
client-level DP accountant's ledger), the round number and the results so far. Clients
keep their own state (personal adapter, privacy ledger) on their disks
(`fedlora.client.state`).

The file is data, never code: one safetensors file (``checkpoint/server.safetensors``)
whose tensors are the arrays and whose metadata is JSON. Resuming rebuilds the strategy
from the run config and then sets the saved values on it, attribute by attribute, each
checked against the fresh object; nothing in the file can name a class or a function.
Pickle files (the format of earlier versions) are never loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from fedlora.core.errors import ConfigError
from fedlora.core.rundir import CHECKPOINT, RoundRecord
from fedlora.lora.adapters import AdapterState
from fedlora.server.resumable import FILE, check_config, checkpoint_path
from fedlora.server.resumable import FORMAT as _FORMAT
from fedlora.server.resumable import VERSION as _VERSION

__all__ = ["Checkpoint", "load_checkpoint", "restore_strategy", "save_checkpoint"]

_SCALARS = (bool, int, float, str, type(None))


@dataclass
class Checkpoint:
    """The server's state after ``round``.

    ``strategy`` is the state tree of the strategy object (see `restore_strategy`), with
    its arrays in ``tensors``; ``num_nodes`` is the population a client-level DP
    accountant was built for (None without client-level DP).
    """

    round: int
    arrays: AdapterState
    rounds: dict[int, RoundRecord]
    config: dict[str, Any]
    wall_s: float
    num_nodes: int | None = None
    strategy: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def record(self) -> ArrayRecord:
        """The global arrays as the strategy returned them (its dtypes kept, e.g. FedAdam's float64)."""
        return ArrayRecord(OrderedDict((k, Array(v.numpy())) for k, v in self.arrays.items()))


def save_checkpoint(out_dir: Path, checkpoint: Checkpoint, strategy: Strategy) -> None:
    """Write ``checkpoint`` and ``strategy``'s state into ``out_dir/checkpoint/``, atomically.

    Raises
    ------
    TypeError
        If the strategy holds state of a kind the format does not store (a new strategy
        with, say, an object of its own as an attribute): fail loudly, not resume wrongly.

    """
    folder = out_dir / CHECKPOINT
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"global/{k}": v for k, v in checkpoint.arrays.items()}
    tree = _encode_object(strategy, "strategy", tensors)
    meta = {
        "format": _FORMAT,
        "version": _VERSION,
        "round": checkpoint.round,
        "wall_s": checkpoint.wall_s,
        "num_nodes": checkpoint.num_nodes,
        "global": list(checkpoint.arrays),  # safetensors sorts names; Flower's DP zips arrays by order
        "config": checkpoint.config,
        "rounds": [dataclasses.asdict(r) for _, r in sorted(checkpoint.rounds.items())],
        "strategy": tree,
    }
    data = save_tensors(
        {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
        metadata={_FORMAT: json.dumps(meta)},
    )
    tmp = folder / f".{FILE}.{os.getpid()}.tmp"
    tmp.write_bytes(data)
    tmp.replace(folder / FILE)


def load_checkpoint(out_dir: Path, config: dict[str, Any]) -> Checkpoint:
    """The last checkpoint in ``out_dir``, checked against the resumed run's ``config``.

    Raises
    ------
    ConfigError
        If there is no readable checkpoint, or the run config differs in a key that
        changes what the run computes.

    """
    path = checkpoint_path(out_dir)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})[_FORMAT])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        checkpoint = _checkpoint_of(meta, tensors)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as err:
        raise ConfigError(
            f"resume: {path} is not a readable fedlora checkpoint ({type(err).__name__}: {err})"
        ) from None
    check_config(config, checkpoint.config)
    return checkpoint


def restore_strategy(strategy: Strategy, checkpoint: Checkpoint) -> None:
    """Set the state saved in ``checkpoint`` on ``strategy``, freshly built from the same config.

    Raises
    ------
    ConfigError
        If the saved state does not fit the strategy (another strategy's checkpoint, or an
        altered file): an attribute it lacks, a value of another kind, an unknown array.

    """
    _decode_object(strategy, checkpoint.strategy, checkpoint.tensors, "strategy")


def _checkpoint_of(meta: Any, tensors: dict[str, torch.Tensor]) -> Checkpoint:
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
        raise ValueError(f"not a {_FORMAT} of version {_VERSION}")
    fields = {f.name for f in dataclasses.fields(RoundRecord)}
    rounds: dict[int, RoundRecord] = {}
    for record in meta["rounds"]:
        if not isinstance(record, dict) or not set(record) <= fields:
            raise ValueError(f"a round record with unknown fields: {sorted(set(record) - fields)}")
        rounds[int(record["round"])] = RoundRecord(**record)
    config, num_nodes, strategy = meta["config"], meta["num_nodes"], meta["strategy"]
    if not isinstance(config, dict) or not isinstance(strategy, dict):
        raise ValueError("config and strategy must be JSON objects")
    if num_nodes is not None and not isinstance(num_nodes, int):
        raise ValueError(f"num_nodes must be an integer, got {num_nodes!r}")
    prefix, order = "global/", meta["global"]
    if not isinstance(order, list) or sorted(f"{prefix}{k}" for k in order) != sorted(
        k for k in tensors if k.startswith(prefix)
    ):
        raise ValueError("the global arrays and their list differ")
    arrays: AdapterState = OrderedDict((k, tensors[f"{prefix}{k}"]) for k in order)
    return Checkpoint(
        round=int(meta["round"]),
        arrays=arrays,
        rounds=rounds,
        config=config,
        wall_s=float(meta["wall_s"]),
        num_nodes=num_nodes,
        strategy=strategy,
        tensors={k: v for k, v in tensors.items() if not k.startswith(prefix)},
    )


# --- strategy state as JSON plus named tensors -------------------------------------------------


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, torch.Tensor))


def _tensor(value: Any) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value


def _is_plain(value: Any) -> bool:
    """JSON-able data: scalars, and lists and str-keyed dicts of them."""
    if isinstance(value, _SCALARS):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict) and not isinstance(value, OrderedDict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _encode_object(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    tree = {}
    for name, value in vars(obj).items():
        node = _encode(value, f"{path}.{name}", tensors)
        if node is not None:
            tree[name] = node
    return tree


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    """One attribute's node; None for what the config rebuilds (functions, modules, classes)."""
    if callable(value) and not isinstance(value, Strategy) or isinstance(value, type(os)):
        return None
    if _is_plain(value):
        return {"value": value}
    if _is_array(value):
        tensors[path] = _tensor(value)
        return {"array": path, "as": _kind(value)}
    if isinstance(value, ArrayRecord):
        for k, array in value.items():
            tensors[f"{path}/{k}"] = torch.from_numpy(np.ascontiguousarray(array.numpy()))
        return {"arrays": {k: f"{path}/{k}" for k in value}, "as": "record"}
    if (
        isinstance(value, Mapping)
        and value
        and all(isinstance(k, str) and _is_array(v) for k, v in value.items())
    ):
        for k, v in value.items():
            tensors[f"{path}/{k}"] = _tensor(v)
        kinds = {_kind(v) for v in value.values()}
        return {
            "arrays": {k: f"{path}/{k}" for k in value},
            "as": kinds.pop() if len(kinds) == 1 else "torch",
            "ordered": isinstance(value, OrderedDict),
        }
    if isinstance(value, (list, tuple)) and value and all(_is_array(v) for v in value):
        for i, v in enumerate(value):
            tensors[f"{path}/{i}"] = _tensor(v)
        return {"list": [f"{path}/{i}" for i in range(len(value))], "as": _kind(value[0])}
    if isinstance(value, Mapping) and not value:
        return {"value": {}, "ordered": isinstance(value, OrderedDict)}
    if callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None)):
        state = value.state_dict()  # e.g. Flower's RdpAccountant: JSON by its own contract
        if not _is_plain(state):
            raise TypeError(f"checkpoint: {path} ({type(value).__name__}) has a state_dict that is not JSON")
        return {"state_dict": state}
    if isinstance(value, Strategy):
        return {"object": _encode_object(value, path, tensors)}
    raise TypeError(f"checkpoint: {path} is a {type(value).__name__}, which a checkpoint cannot store")


def _kind(value: Any) -> str:
    return "numpy" if isinstance(value, np.ndarray) else "torch"


def _decode_object(obj: Any, tree: Any, tensors: Mapping[str, torch.Tensor], path: str) -> None:
    if not isinstance(tree, dict):
        raise ConfigError(f"resume: the checkpoint's {path} is not an object")
    for name, node in tree.items():
        where = f"{path}.{name}"
        if not isinstance(name, str) or name not in vars(obj):
            raise ConfigError(
                f"resume: the checkpoint sets {where}, which {type(obj).__name__} does not have"
            )
        current = getattr(obj, name)
        if not isinstance(node, dict):
            raise ConfigError(f"resume: the checkpoint's {where} is malformed")
        if "object" in node:
            if not isinstance(current, Strategy):
                raise ConfigError(f"resume: the checkpoint's {where} is an object, the strategy's is not")
            _decode_object(current, node["object"], tensors, where)
        elif "state_dict" in node:
            try:
                current.load_state_dict(node["state_dict"])
            except (AttributeError, KeyError, TypeError, ValueError) as err:
                raise ConfigError(f"resume: the checkpoint's {where} does not fit ({err})") from None
        else:
            setattr(obj, name, _decode_value(node, current, tensors, where))


def _decode_value(node: dict[str, Any], current: Any, tensors: Mapping[str, torch.Tensor], where: str) -> Any:
    def take(name: Any, kind: Any) -> Any:
        if not isinstance(name, str) or name not in tensors:
            raise ConfigError(f"resume: the checkpoint's {where} names an array it does not hold")
        tensor = tensors[name]
        return tensor.numpy() if kind in ("numpy", "record") else tensor

    kind = node.get("as")
    if "value" in node:
        value = node["value"]
        if current is not None and value is not None and not _same_kind(current, value):
            raise ConfigError(
                f"resume: the checkpoint's {where} is a {type(value).__name__}, "
                f"the strategy's a {type(current).__name__}"
            )
        if isinstance(current, tuple) and isinstance(value, list):
            return tuple(value)
        return OrderedDict(value) if node.get("ordered") else value
    if "array" in node:
        return take(node["array"], kind)
    if "list" in node and isinstance(node["list"], list):
        return [take(name, kind) for name in node["list"]]
    if "arrays" in node and isinstance(node["arrays"], dict):
        arrays = {k: take(name, kind) for k, name in node["arrays"].items()}
        if kind == "record":
            return ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return OrderedDict(arrays) if node.get("ordered") else arrays
    raise ConfigError(f"resume: the checkpoint's {where} is malformed")


def _same_kind(current: Any, value: Any) -> bool:
    numbers = (int, float)
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, numbers) and isinstance(value, numbers):
        return True
    if isinstance(current, (list, tuple)):
        return isinstance(value, list)
    if isinstance(current, Mapping):
        return isinstance(value, dict)
    return isinstance(value, type(current))
