"""A Flower session: a private Flower home and ports, whose SuperLink (and warm Ray) serve several runs."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedlora.core.errors import ConfigError, FedloraError
from fedlora.launch.processes import flower_env, flower_script, free_port, stop_flower
from fedlora.server.runs_root import RUNS_ROOT_ENV

__all__ = ["BACKENDS", "FlowerSession", "check_ray_address", "flower_session", "start_ray", "start_warm"]

# How a session's runs execute their clients: on Ray actors, in parallel (Flower's own
# simulation), or in a simulation forked from the session's warm process, in turn.
BACKENDS = ("ray", "warm")
_STAND_IN = Path(__file__).with_name("_stand_in.py")

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
    # "warm": each run's simulation is forked from a warm process of the session (`start_warm`).
    backend: str = "ray"
    _started: list[str] = field(default_factory=list, repr=False, compare=False)

    @property
    def ray_owned(self) -> bool:
        """Whether the runs join a Ray that the session itself starts (and stops)."""
        return self.warm_ray and not self.ray_address and self.backend == "ray"

    @property
    def outlives_runs(self) -> bool:
        """Whether the session keeps processes of its own across runs (its Ray, its warm process)."""
        return self.ray_owned or self.backend == "warm"

    @property
    def bin(self) -> Path:
        """A folder first on the PATH of the session's Flower processes (the warm stand-in)."""
        return self.root / "bin"

    def ray(self) -> str:
        """The address of the Ray the runs join ("" for a Ray of each run's own).

        A session's own Ray (or warm process) starts on the first call: a session whose runs all
        turn out to be finished already (a sweep's ``reuse``) starts none.
        """
        if self.backend == "warm":
            if not self._started:
                self._started.append(start_warm(self))
            return ""
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
        env = {**self.home_env(), **({"RAY_ADDRESS": ray} if ray else {})}
        if self.backend == "warm":
            # SuperExec starts `flwr-simulation` from PATH: the stand-in comes first.
            env["PATH"] = os.pathsep.join([str(self.bin), flower_env()["PATH"]])
        return env

    def home_env(self) -> dict[str, str]:
        """The variables that name the session's Flower home, runs folder and ports."""
        return {
            RUNS_ROOT_ENV: str(self.runs),
            "FLWR_HOME": str(self.home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(self.control_port),
        }


@contextlib.contextmanager
def flower_session(
    ray_address: str = "", *, warm_ray: bool = False, backend: str = "ray"
) -> Iterator[FlowerSession]:
    """Let several `simulate` calls share one local SuperLink, stopped when the block ends.

    Saves the SuperLink's start-up (several seconds) on every run after the first; runs
    stay independent (each has its own run id, config and results). ``ray_address``: run
    the simulations on that existing Ray cluster (``HOST:PORT`` of its head, or ``auto``).
    ``warm_ray`` (without ``ray_address``): a Ray of the session's own on this machine,
    started for the first run, which every run joins instead of starting and stopping one
    (Flower's simulation otherwise does both, about 10 s a run on 2 cores); the session
    stops it. Its workers take the environment of the moment it starts. ``backend="warm"``:
    no Ray; each run's simulation is forked from a warm process of the session, started for
    the first run, which has imported torch, transformers and fedlora, and runs its clients
    in turn (`fedlora.launch.warm`).
    """
    check_ray_address(ray_address)
    if backend not in BACKENDS:
        raise ConfigError(f"backend: must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "warm" and ray_address:
        raise ConfigError(f"backend: 'warm' runs no Ray; leave ray-address empty, got {ray_address!r}")
    with tempfile.TemporaryDirectory(prefix="fedlora-", ignore_cleanup_errors=True) as tmp:
        session = FlowerSession(Path(tmp), ray_address=ray_address, warm_ray=warm_ray, backend=backend)
        try:
            yield session
        finally:
            stop_flower(session.home, everything=session.outlives_runs)


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


def start_warm(session: FlowerSession, timeout: float = 300.0) -> str:
    """Start the session's warm process and its ``flwr-simulation`` stand-in; return the socket's path.

    Waits until the warm process has imported everything and listens (its output goes to
    ``warm.log`` in the session's folder).
    """
    socket_path = session.root / "warm.sock"
    session.bin.mkdir(parents=True, exist_ok=True)
    stand_in = session.bin / "flwr-simulation"
    stand_in.write_text(
        "#!/bin/sh\n"
        # -I -S: the stand-in needs the standard library only, and starts in milliseconds.
        f"exec {shlex.quote(sys.executable)} -I -S {shlex.quote(str(_STAND_IN))} "
        f'{shlex.quote(str(socket_path))} {shlex.quote(flower_script("flwr-simulation"))} "$@"\n'
    )
    stand_in.chmod(0o755)
    log = session.root / "warm.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedlora.launch.warm", str(socket_path)],
            env=flower_env(session.home_env()),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=session.root,
        )
    deadline = time.monotonic() + timeout
    while not socket_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_flower(session.home, everything=True)
            tail = log.read_text(errors="replace").strip().splitlines()[-1:]
            why = tail[0] if tail else "no output"
            raise FedloraError(f"backend: the session's warm process did not start ({why}); see {log}")
        time.sleep(0.05)
    return str(socket_path)
