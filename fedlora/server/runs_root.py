"""Where a run may write: a run directory always lies inside the server's runs folder.

The run config's ``out-dir`` comes from whoever submitted the run; the folder it may name
is the server's own choice, made where the ServerApp runs: the environment variable
``FEDLORA_RUNS_ROOT`` (``fedlora server --runs-dir`` sets it for its SuperLink, a
``fedlora simulate`` session for its own), else the ServerApp's working directory. A
relative ``out-dir`` is a folder inside that root; an absolute one must lie inside it.
``..`` that would leave the root, and the root itself, are refused, so a run config
cannot make the server read or write anything but a run directory of its own. Symbolic
links inside the root are the server owner's and are followed.

A deployed server (`deployed`) reads no client data and no model a run config names
(`check_server_reads`): its labels come from the run config, its model is a bundled one
or a folder inside its runs folder. Reading client data is the simulation's business.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.core.errors import ConfigError
from fedlora.core.rundir import CHECKPOINT, SUMMARY

if TYPE_CHECKING:
    from fedlora.config import RunConfig

__all__ = [
    "DEPLOYED_ENV",
    "RUNS_ROOT_ENV",
    "check_server_reads",
    "deployed",
    "held_run",
    "run_directory",
    "runs_root",
]

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


def check_server_reads(cfg: RunConfig, bundled: frozenset[str], root: Path | None = None) -> None:
    """Refuse a run config that would make a deployed server read client data or a model of its choosing.

    Parameters
    ----------
    cfg : RunConfig
        The submitted run's configuration.
    bundled : frozenset[str]
        The bundled model names (loaded from fedlora's own packages).
    root : Path or None
        The runs folder (default `runs_root`).

    Raises
    ------
    ConfigError
        If a classification run gives no ``labels`` (the server would read its data
        folder or dataset to find them), or ``model`` is neither bundled nor a folder
        inside the runs folder.

    """
    data, model = cfg.data, cfg.model
    if model.task == "classification" and not data.labels and (data.data_dir or data.hf_dataset):
        raise ConfigError(
            "labels: a deployed server reads no client data (data-dir, hf: datasets); "
            "give the run's label set in its config (labels=a,b,c)"
        )
    if model.model in bundled:
        return
    root = (runs_root() if root is None else root).resolve()
    path = Path(model.model).expanduser().resolve()  # as the model loader reads it
    if root not in path.parents or not path.is_dir():  # not a hub id either: that would download
        raise ConfigError(
            f"model: a deployed server loads a bundled model ({', '.join(sorted(bundled))}) or a model "
            f"folder inside its runs folder {root}, not {model.model!r}"
        )
