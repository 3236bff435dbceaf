"""A supervised child process: output echoed, signals forwarded, restarts on a refusal."""

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

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
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
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


@contextlib.contextmanager
def companion(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    echo: Callable[[str], None] | None = None,
    stop_within: float = 10.0,
) -> Iterator[subprocess.Popen[str]]:
    """Run ``command`` beside the supervised one, for as long as the ``with`` block lasts.

    Its output is echoed line by line; on leaving the block it gets SIGTERM, then SIGKILL
    after ``stop_within`` seconds.

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

    Yields
    ------
    subprocess.Popen
        The running process.

    """
    child = subprocess.Popen(
        list(command), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    reader = threading.Thread(target=_pump, args=(child, deque(maxlen=1), echo or _to_stderr), daemon=True)
    reader.start()
    try:
        yield child
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=stop_within)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        reader.join(timeout=5)
