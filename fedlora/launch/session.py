"""A Flower session: a private Flower home and ports, whose SuperLink (and warm Ray) serve several runs."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedlora.core.errors import ConfigError, FedloraError
from fedlora.launch.processes import flower_env, flower_script, free_port, stop_flower
from fedlora.server.runs_root import RUNS_ROOT_ENV

__all__ = ["FlowerSession", "check_ray_address", "flower_session", "start_ray"]

_RAY_ADDRESS = re.compile(r"auto|(ray://)?[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}")


def check_ray_address(ray_address: str) -> None:
    """Refuse a Ray address that is neither ``auto`` nor ``HOST:PORT`` (empty: none), in one line."""
    if ray_address and not _RAY_ADDRESS.fullmatch(ray_address):
        raise ConfigError(
            f"ray-address: must be auto or HOST:PORT of a Ray head (ray start --head), got {ray_address!r}"
        )


@dataclass(frozen=True)
class FlowerSession:
    """A private Flower home and ports, whose local SuperLink serves several runs in turn.

    `flwr run` starts its local SuperLink on fixed ports unless told otherwise, and reuses
    whatever SuperLink answers there: each session picks free ports of its own so that
    concurrent runs (two sweeps, a test beside a demo) never share or stop each other's.
    """

    root: Path
    http_port: int = field(default_factory=free_port)
    control_port: int = field(default_factory=free_port)
    # An existing Ray cluster (`ray start`) the simulations run on.
    ray_address: str = ""
    # Without one: a Ray of the session's own, started for its first run and stopped with it.
    warm_ray: bool = False
    _started: list[str] = field(default_factory=list, repr=False, compare=False)

    @property
    def ray_owned(self) -> bool:
        """Whether the runs join a Ray that the session itself starts (and stops)."""
        return self.warm_ray and not self.ray_address

    def ray(self) -> str:
        """The address of the Ray the runs join ("" for a Ray of each run's own).

        A session's own Ray starts on the first call: a session whose runs all turn out to be
        finished already (a sweep's ``reuse``) starts none.
        """
        if not self.ray_owned:
            return self.ray_address
        if not self._started:
            self._started.append(start_ray(self))
        return self._started[0]

    @property
    def home(self) -> Path:
        """The ``FLWR_HOME`` of every run in the session."""
        return self.root / "flwr-home"

    @property
    def runs(self) -> Path:
        """The session's runs folder: each run's directory is linked into it while the run goes.

        The ServerApp takes it as its runs root (`fedlora.server.runs_root`), so a run config
        can name only the run directory its `simulate` call chose.
        """
        return self.root / "runs"

    def env(self) -> dict[str, str]:
        """Environment variables that point `flwr run` at this session's SuperLink (and Ray)."""
        ray = self.ray()
        # Flower's simulation calls ray.init(), which joins the cluster RAY_ADDRESS names.
        return {**self.home_env(), **({"RAY_ADDRESS": ray} if ray else {})}

    def home_env(self) -> dict[str, str]:
        """The variables that name the session's Flower home, runs folder and ports."""
        return {
            RUNS_ROOT_ENV: str(self.runs),
            "FLWR_HOME": str(self.home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(self.control_port),
        }


@contextlib.contextmanager
def flower_session(ray_address: str = "", *, warm_ray: bool = False) -> Iterator[FlowerSession]:
    """Let several `simulate` calls share one local SuperLink, stopped when the block ends.

    Saves the SuperLink's start-up (several seconds) on every run after the first; runs
    stay independent (each has its own run id, config and results). ``ray_address``: run
    the simulations on that existing Ray cluster (``HOST:PORT`` of its head, or ``auto``).
    ``warm_ray`` (without ``ray_address``): a Ray of the session's own on this machine,
    started for the first run, which every run joins instead of starting and stopping one
    (Flower's simulation otherwise does both, about 10 s a run on 2 cores); the session
    stops it. Its workers take the environment of the moment it starts.
    """
    check_ray_address(ray_address)
    with tempfile.TemporaryDirectory(prefix="fedlora-", ignore_cleanup_errors=True) as tmp:
        session = FlowerSession(Path(tmp), ray_address=ray_address, warm_ray=warm_ray)
        try:
            yield session
        finally:
            stop_flower(session.home, everything=session.ray_owned)


def start_ray(session: FlowerSession) -> str:
    """Start a Ray head for ``session`` (its processes carry the session's FLWR_HOME) and return its address.

    A private temporary folder keeps it apart from any other Ray on the machine: a run outside
    the session never joins it by accident.
    """
    port = free_port()
    command = [
        flower_script("ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--temp-dir={session.root / 'ray'}",
        f"--num-cpus={os.cpu_count() or 1}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    try:
        env = flower_env(session.home_env())
        subprocess.run(command, env=env, capture_output=True, check=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        detail = (
            err.stderr.decode(errors="replace").strip().splitlines()[-1:]
            if isinstance(err, subprocess.CalledProcessError) and err.stderr
            else [type(err).__name__]
        )
        stop_flower(session.home, everything=True)
        raise FedloraError(
            f"warm-ray: could not start Ray for the session ({detail[0] if detail else err})"
        ) from None
    return f"127.0.0.1:{port}"
