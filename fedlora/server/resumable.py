"""Whether a run directory can be resumed with a config: checked from the checkpoint's header alone.

The launcher checks this before Flower starts, without torch: the checkpoint exists (and is
not an earlier version's pickle), its header is fedlora's, and the resumed run changes no
key that changes what the run computes. The ServerApp then loads the arrays and the
strategy's state once (`fedlora.server.checkpoint.load_checkpoint`), with the same checks.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from fedlora.config import keys_where
from fedlora.core.errors import ConfigError
from fedlora.core.rundir import CHECKPOINT

__all__ = ["FILE", "FORMAT", "VERSION", "check_config", "check_resumable"]

FILE = "server.safetensors"
PICKLED = "server.pkl"  # earlier versions' format: refused, never read
FORMAT, VERSION = "fedlora-server-checkpoint", 1
# Keys a resumed run may change: how long and how patiently it runs, not what it computes.
MAY_CHANGE = keys_where("resumable")
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own bound on a header


def checkpoint_path(out_dir: Path) -> Path:
    """``out_dir``'s checkpoint file; a missing one, or an earlier version's pickle, is refused."""
    path = out_dir / CHECKPOINT / FILE
    if not path.is_file():
        if (out_dir / CHECKPOINT / PICKLED).exists():
            raise ConfigError(
                f"resume: {out_dir} holds a pickled checkpoint ({CHECKPOINT}/{PICKLED}) of an earlier "
                f"fedlora version; pickle files can run code, so it is not loaded: start the run afresh"
            )
        raise ConfigError(f"resume: {out_dir} has no checkpoint ({CHECKPOINT}/{FILE}) to resume from")
    return path


def check_config(config: dict[str, Any], saved: dict[str, Any]) -> None:
    """Refuse a resumed run's ``config`` that differs from the ``saved`` one in a key that changes the run."""
    for key in sorted(set(config) | set(saved)):
        if key in MAY_CHANGE:
            continue
        if config.get(key) != saved.get(key):
            raise ConfigError(
                f"{key}: the resumed run has {config.get(key)!r}, its checkpoint {saved.get(key)!r}; "
                f"a resumed run may only change {', '.join(sorted(MAY_CHANGE - {'resume'}))}"
            )


def check_resumable(out_dir: Path, config: dict[str, Any]) -> None:
    """Check, from its header alone, that ``out_dir``'s checkpoint can go on with ``config``."""
    path = checkpoint_path(out_dir)
    try:
        with path.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > _HEADER_LIMIT:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(fh.read(size))
        meta = json.loads(header["__metadata__"][FORMAT])
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} of version {VERSION}")
        saved = meta["config"]
        if not isinstance(saved, dict):
            raise ValueError("config must be a JSON object")
    except (OSError, KeyError, ValueError, TypeError, struct.error) as err:
        why = f"{type(err).__name__}: {err}"
        raise ConfigError(f"resume: {path} is not a readable fedlora checkpoint ({why})") from None
    check_config(config, saved)
