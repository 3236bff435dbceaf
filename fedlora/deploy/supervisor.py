"""Supervised processes: output echoed, signals forwarded, restarts after a refusal or an exit."""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from fedlora.launch.processes import handling

__all__ = ["companion", "supervise"]

# The package's logger, so that its records keep the name they had before the package split.
log = logging.getLogger("fedlora.deploy")


def _to_stderr(line: str) -> None:
    sys.stderr.write(line)
    sys.stderr.flush()


def _pump(child: subprocess.Popen[str], tail: deque[str], echo: Callable[[str], None]) -> None:
    assert child.stdout is not None
    for line in child.stdout:
        tail.append(line)
        echo(line)


def supervise(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    retry_when: Callable[[int, Sequence[str]], str | None] | None = None,
    retry_for: float = 0.0,
    retry_every: float = 5.0,
    echo: Callable[[str], None] | None = None,
    report: Callable[[str], None] = log.warning,
) -> int:
    """Run ``command``; restart it for up to ``retry_for`` s while ``retry_when`` gives a reason.

    SIGTERM and SIGINT are forwarded to the child and end the supervision. Call from the
    main thread.

    Parameters
    ----------
    command : Sequence[str]
        The child's command line.
    env : Mapping[str, str]
        The child's environment.
    retry_when : callable or None
        ``retry_when(exit_code, last_lines)`` says why an exit deserves a restart (None: it
        does not). None: never restart.
    retry_for : float
        Seconds after the start during which restarts are allowed.
    retry_every : float
        Seconds between an exit and the restart.
    echo : callable or None
        Gets the child's output line by line (default: this process's stderr).
    report : callable
        Gets a line saying why a restart happens or stops.

    Returns
    -------
    int
        The child's exit status (128 + signal number if a signal ended it).

    """
    echo = echo or _to_stderr
    deadline = time.monotonic() + retry_for
    received: list[int] = []
    child: subprocess.Popen[str] | None = None

    def forward(signum: int, _frame: Any) -> None:
        received.append(signum)
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    with handling((signal.SIGTERM, signal.SIGINT), forward) as installed:
        if not installed:
            raise RuntimeError("supervise: call it from the main thread, which alone receives signals")
        while True:
            child = subprocess.Popen(
                list(command), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            if received:  # a signal arrived while the child was starting
                child.send_signal(received[-1])
            tail: deque[str] = deque(maxlen=40)
            reader = threading.Thread(target=_pump, args=(child, tail, echo), daemon=True)
            reader.start()
            # Reap the child now, not at the end of its output: its own children (Flower's
            # SuperExec) hold the pipe open and exit only once their parent is gone.
            code = child.wait()
            reader.join(timeout=10)
            why = retry_when(code, list(tail)) if retry_when is not None and not received else None
            if why is None:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                report(f"{why}; giving up" + (f" after {retry_for:.0f} s" if retry_for > 0 else ""))
                break
            wait = min(retry_every, left)
            report(f"{why}; retrying in {wait:.0f} s ({left:.0f} s left)")
            until = time.monotonic() + wait
            while not received and time.monotonic() < until:
                time.sleep(0.2)
            if received:
                break
    return 128 - code if code < 0 else code


def _describe(code: int) -> str:
    return f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"


@contextlib.contextmanager
def companion(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    echo: Callable[[str], None] | None = None,
    stop_within: float = 10.0,
    restart_after: float | None = None,
    name: str = "the companion",
    report: Callable[[str], None] = log.warning,
) -> Iterator[Callable[[], subprocess.Popen[str]]]:
    """Run ``command`` beside the supervised one, for as long as the ``with`` block lasts.

    Its output is echoed line by line; on leaving the block it gets SIGTERM, then SIGKILL
    after ``stop_within`` seconds. With ``restart_after``, a companion that exits while the
    block lasts is started again after that many seconds, doubled (up to 60 s) each time it
    lives less than a minute, and each restart is reported.

    Parameters
    ----------
    command : Sequence[str]
        The companion's command line.
    env : Mapping[str, str]
        Its environment.
    echo : callable or None
        Gets its output line by line (default: this process's stderr).
    stop_within : float
        Seconds it is given to exit after SIGTERM.
    restart_after : float or None
        Seconds between an exit and the restart; None: never restart.
    name : str
        What the reports call it.
    report : callable
        Gets a line for each restart.

    Yields
    ------
    callable
        Returns the process running now (a restart replaces it).

    """
    echo = echo or _to_stderr
    stopping = threading.Event()
    lock = threading.Lock()

    def start() -> tuple[subprocess.Popen[str], threading.Thread]:
        child = subprocess.Popen(
            list(command), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        reader = threading.Thread(target=_pump, args=(child, deque(maxlen=1), echo), daemon=True)
        reader.start()
        return child, reader

    running = [start()]

    def restart_forever(first_wait: float) -> None:
        wait, started = first_wait, time.monotonic()
        while True:
            code = running[-1][0].wait()
            wait = first_wait if time.monotonic() - started >= 60 else wait
            if stopping.wait(wait):  # the block ended meanwhile: no restart
                return
            with lock:
                if stopping.is_set():
                    return
                report(f"{name} {_describe(code)}; restarted it after {wait:g} s")
                running.append(start())
            started, wait = time.monotonic(), min(2 * wait, 60.0)

    watcher = None
    if restart_after is not None:
        watcher = threading.Thread(target=restart_forever, args=(restart_after,), daemon=True)
        watcher.start()
    try:
        yield lambda: running[-1][0]
    finally:
        with lock:
            stopping.set()
        child, reader = running[-1]
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=stop_within)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if watcher is not None:
            watcher.join(timeout=5)
        reader.join(timeout=5)
