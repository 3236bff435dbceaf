"""Where a run may write: a run directory always lies inside the server's runs folder.

The run config's ``out-dir`` comes from whoever submitted the run; the folder it may name
is the server's own choice, made where the ServerApp runs: the environment variable
``FEDLORA_RUNS_ROOT`` (``fedlora server --runs-dir`` sets it for its SuperLink, a
``fedlora simulate`` session for its own), else the ServerApp's working directory. A
relative ``out-dir`` is a folder inside that root; an absolute one must lie inside it.
``..`` that would leave the root, and the root itself, are refused, so a run config
cannot make the server read or write anything but a run directory of its own. Symbolic
links inside the root are the server owner's and are followed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fedlora.core.errors import ConfigError
from fedlora.core.rundir import CHECKPOINT, SUMMARY

__all__ = ["DEPLOYED_ENV", "RUNS_ROOT_ENV", "deployed", "held_run", "run_directory", "runs_root"]

RUNS_ROOT_ENV = "FEDLORA_RUNS_ROOT"
# Set (to "1") by `fedlora server` for its SuperLink and ServerApps: a deployed server reads
# no client data and no model path from a run config (`fedlora.server.loop`).
DEPLOYED_ENV = "FEDLORA_DEPLOYED"


def deployed() -> bool:
    """Whether this ServerApp serves a deployment (`fedlora server`), not a simulation."""
    return os.environ.get(DEPLOYED_ENV) == "1"


def runs_root() -> Path:
    """The server's runs folder: ``$FEDLORA_RUNS_ROOT``, else the working directory."""
    return Path(os.environ.get(RUNS_ROOT_ENV) or os.getcwd()).expanduser().absolute()


def run_directory(out_dir: str, root: Path | None = None) -> Path:
    """The run directory that ``out-dir`` names, inside ``root`` (default `runs_root`).

    Empty ``out-dir``: ``<root>/<UTC timestamp>`` under ``FEDLORA_RUNS_ROOT``, else
    ``runs/<UTC timestamp>`` under the working directory (where `flwr run .` users find it).

    Raises
    ------
    ConfigError
        If ``out-dir`` names a folder outside the root, or the root itself.

    """
    if root is None:
        root = runs_root()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if not out_dir:
        return (root / (stamp if os.environ.get(RUNS_ROOT_ENV) else f"runs/{stamp}")).resolve()
    wanted = Path(out_dir).expanduser()
    inside = None
    if not wanted.is_absolute():
        inside = os.path.normpath(wanted)
    else:
        for base in (root, root.resolve()):
            relative = os.path.relpath(os.path.normpath(wanted), base)
            if not _leaves(relative):
                inside = relative
                break
    if inside is None or _leaves(inside) or inside == os.curdir:
        raise ConfigError(
            f"out-dir: {out_dir!r} is not a folder inside the server's runs folder {root}; name one inside "
            f"it (the server chooses its runs folder: {RUNS_ROOT_ENV}, or `fedlora server --runs-dir`)"
        )
    return (root / inside).resolve()


def _leaves(relative: str) -> bool:
    return os.path.isabs(relative) or relative == os.pardir or relative.startswith(os.pardir + os.sep)


def held_run(out_dir: Path) -> str | None:
    """What a new run in ``out_dir`` would lose: ``"finished"``, ``"unfinished"`` (a checkpoint), or None."""
    if (out_dir / SUMMARY).exists():
        return "finished"
    if (out_dir / CHECKPOINT).exists():
        return "unfinished"
    return None
