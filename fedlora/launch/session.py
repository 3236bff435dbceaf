"""A Flower session: a private Flower home and ports, whose SuperLink (and warm Ray) serve several runs."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedlora.core.errors import ConfigError, FedloraError
from fedlora.launch.processes import flower_env, flower_script, free_port, stop_flower
from fedlora.server.runs_root import RUNS_ROOT_ENV

__all__ = [
    "BACKENDS",
    "SESSION_ENV",
    "FlowerSession",
    "check_ray_address",
    "flower_session",
    "joined_session",
    "start_ray",
    "start_warm",
]

# How a session's runs execute their clients: on Ray actors, in parallel (Flower's own
# simulation), or in a simulation forked from the session's warm process, in turn.
BACKENDS = ("ray", "warm")
_STAND_IN = Path(__file__).with_name("_stand_in.py")
# A session's folder, in the environment of other processes, lets their runs join it (`joined_session`).
SESSION_ENV = "FEDLORA_SESSION"
_STATE = "session.json"

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
    # Opened by another process, whose folder ``$FEDLORA_SESSION`` names: ending it here stops nothing.
    joined: bool = False
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
                self._started.append(self._start_once("warm", start_warm))
            return ""
        if not self.ray_owned:
            return self.ray_address
        if not self._started:
            self._started.append(self._start_once("ray", start_ray))
        return self._started[0]

    def _start_once(self, name: str, start: Callable[[FlowerSession], str]) -> str:
        """``start(self)``, unless a process of the session (its owner or one that joined) did already."""
        with (self.root / "start.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two processes joining at once start one
            record = self.root / f"{name}.started"
            if record.exists():
                return record.read_text()
            started = start(self)
            record.write_text(started)
            return started

    def save(self) -> None:
        """Write what another process needs to join the session (`joined_session`) into its folder."""
        state = {
            "http_port": self.http_port,
            "control_port": self.control_port,
            "ray_address": self.ray_address,
            "warm_ray": self.warm_ray,
            "backend": self.backend,
            "pid": os.getpid(),
        }
        (self.root / _STATE).write_text(json.dumps(state))

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
    ray_address: str = "", *, warm_ray: bool = False, backend: str | None = None
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

    Where ``$FEDLORA_SESSION`` names a session of another process (`fedlora session`) that
    runs on the backend and Ray asked for (``backend=None``: any), the block joins it
    instead: its runs use that session's SuperLink and warm process, and ending the block
    stops nothing.
    """
    check_ray_address(ray_address)
    if backend is not None and backend not in BACKENDS:
        raise ConfigError(f"backend: must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "warm" and ray_address:
        raise ConfigError(f"backend: 'warm' runs no Ray; leave ray-address empty, got {ray_address!r}")
    joined = joined_session()
    if joined is not None and backend in (None, joined.backend) and ray_address in ("", joined.ray_address):
        yield joined
        return
    with tempfile.TemporaryDirectory(prefix="fedlora-", ignore_cleanup_errors=True) as tmp:
        session = FlowerSession(
            Path(tmp), ray_address=ray_address, warm_ray=warm_ray, backend=backend or "ray"
        )
        session.save()
        try:
            yield session
        finally:
            stop_flower(session.home, everything=session.outlives_runs)


def joined_session() -> FlowerSession | None:
    """The session whose folder ``$FEDLORA_SESSION`` names, to join (None where it is unset or empty).

    Refuses, in one line, a folder that holds no open session.
    """
    value = os.environ.get(SESSION_ENV, "")
    if not value:
        return None
    root = Path(value)
    where = f"{SESSION_ENV}={value}"
    try:
        state = json.loads((root / _STATE).read_text())
        pid, backend = int(state["pid"]), str(state["backend"])
        ports = int(state["http_port"]), int(state["control_port"])
        ray_address, warm_ray = str(state["ray_address"]), bool(state["warm_ray"])
    except FileNotFoundError:
        raise ConfigError(
            f"{where}: no fedlora session there (it has ended, or the path is wrong); "
            "start one with `fedlora session`, or unset the variable"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{where}: not a fedlora session's folder ({_STATE}: {err})") from None
    if backend not in BACKENDS:
        raise ConfigError(f"{where}: not a fedlora session's folder (backend {backend!r})")
    # Its bin/ comes first on the PATH of the runs' Flower processes: only a folder of this
    # user's own that nobody else can write into is joined.
    mode = root.stat()
    if mode.st_uid != os.getuid() or mode.st_mode & 0o077:
        raise ConfigError(
            f"{where}: the folder must be this user's own and private (mode 0700, as "
            f"`fedlora session` makes it), got owner {mode.st_uid} and mode {oct(mode.st_mode & 0o777)}"
        )
    if not Path(f"/proc/{pid}").exists():
        raise ConfigError(f"{where}: the session has ended (its process {pid} is gone); unset the variable")
    return FlowerSession(
        root.resolve(),
        http_port=ports[0],
        control_port=ports[1],
        ray_address=ray_address,
        warm_ray=warm_ray,
        backend=backend,
        joined=True,
    )


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
