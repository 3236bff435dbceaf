"""``flwr-simulation`` in a warm session: ask the session's warm process to fork the simulation.

Run as ``python -I -S _stand_in.py SOCKET REAL_FLWR_SIMULATION ARGS...`` (the standard
library only: it starts in milliseconds). Exits with the forked child's status, passes
SIGTERM, SIGINT and SIGHUP on to it, and runs Flower's own ``flwr-simulation`` when the
warm process cannot be reached. See `fedlora.launch.warm`.
"""

import json
import os
import signal
import socket
import sys


def main() -> None:
    socket_path, real, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(socket_path)
        request = {
            "argv": ["flwr-simulation", *args],
            "env": dict(os.environ),
            "cwd": os.getcwd(),
            "pid": os.getpid(),
        }
        conn.sendall(json.dumps(request).encode() + b"\n")
        replies = conn.makefile("r")
        child = int(replies.readline())
    except (OSError, ValueError):
        conn.close()
        os.execv(real, [real, *args])  # no warm process: Flower's own, as if there were no session
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: _forward(child, signum))
    while True:
        try:
            line = replies.readline()
            break
        except InterruptedError:
            continue
    sys.exit(int(line) if line.strip().lstrip("-").isdigit() else 1)


def _forward(child: int, signum: int) -> None:
    try:
        os.kill(child, signum)
    except OSError:
        pass


if __name__ == "__main__":
    main()
