"""Flower's processes: their environment, SIGTERM as Ctrl-C, and stopping every process of a Flower home."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "FLOWER_ENV",
    "handling",
    "alive",
    "flower_env",
    "flower_script",
    "free_port",
    "signal_run",
    "started_at",
    "stop_flower",
    "terminate_as_interrupt",
    "uptime",
]

# Flower must not install dependencies at run time (it would pull a CUDA torch), phone
# home, or check for updates: fedlora runs offline.
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
    "TOKENIZERS_PARALLELISM": "false",
    # SuperExec looks for a new run every second by default: a run's start waits up to that.
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
}


def flower_script(name: str) -> str:
    """A console script of this interpreter's environment (works without activating it)."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name) or name


def flower_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process: offline settings, this environment's scripts first.

    Flower starts ``flower-superlink``, ``flower-superexec`` and the app processes from PATH,
    so an unactivated virtual environment must come first on it.
    """
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, **FLOWER_ENV, "PATH": path, **(extra or {})}


@contextlib.contextmanager
def handling(signals: Iterable[int], handler: Callable[[int, Any], None]) -> Iterator[bool]:
    """Inside the block ``handler`` receives ``signals``; the previous handlers come back after it.

    Yields whether the handler was installed: only the main thread may install one, and
    elsewhere nothing is changed.
    """
    try:
        previous = {sig: signal.signal(sig, handler) for sig in signals}
    except ValueError:  # not the main thread: leave signals alone
        yield False
        return
    try:
        yield True
    finally:
        for sig, earlier in previous.items():
            signal.signal(sig, earlier)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM (a supervisor, a closed terminal) stops the run as Ctrl-C does."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    with handling([signal.SIGTERM], interrupt):
        yield


def stop_flower(flwr_home: Path, *, everything: bool = False, since: float | None = None) -> None:
    """Stop the SuperLink/SuperExec that `flwr run` started for this FLWR_HOME.

    With ``everything``, every process of the run goes: `flwr run`, the simulation that
    runs the ServerApp and its Ray workers too (they all inherit the run's FLWR_HOME);
    the sweep is repeated until none is left, since a dying parent may start a last child.
    ``since`` (seconds since boot, `uptime`) spares processes started before it: a
    session's own Ray, which outlives an interrupted run.
    """
    for _ in range(5 if everything else 1):
        stopped = signal_run(flwr_home, everything=everything, since=since)
        if not stopped:
            return
        deadline = time.monotonic() + 10
        for pid in stopped:
            while time.monotonic() < deadline and alive(pid):
                time.sleep(0.1)
            if alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs: one that exited but was not yet reaped (a zombie) is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def uptime() -> float:
    """Seconds since boot: the clock of the start times in ``/proc/<pid>/stat``."""
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def started_at(proc: Path) -> float:
    """When the process at ``proc`` (``/proc/<pid>``) started, in seconds since boot (stat field 22)."""
    fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def signal_run(flwr_home: Path, *, everything: bool, since: float | None = None) -> list[int]:
    """SIGTERM to the processes of this FLWR_HOME; returns their pids.

    Only Flower's servers unless ``everything``; only those started at or after ``since``
    (seconds since boot) if given.
    """
    marker = f"FLWR_HOME={flwr_home}".encode()
    stopped: list[int] = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int(proc.name) == os.getpid():
                continue
            cmdline = (proc / "cmdline").read_bytes()
            if not everything and b"flower-super" not in cmdline:
                continue
            if since is not None and started_at(proc) < since:
                continue
            if marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            os.kill(int(proc.name), signal.SIGTERM)
            stopped.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return stopped


def free_port() -> int:
    """A TCP port free on 127.0.0.1 when asked."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
