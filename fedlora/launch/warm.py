"""A warm session's simulations: forked from a process that has imported everything a run needs.

Flower starts a new ``flwr-simulation`` process for every run, and that process starts Ray
actors which import torch, transformers and fedlora and load the base model again: most of
a small run's time (`simulations/bench_startup.py`). A session with ``backend="warm"``
(`fedlora.launch.session`) starts one *warm process* (`serve`) that imports all of that
once, and puts a stand-in ``flwr-simulation`` first on the PATH of its SuperLink. The
stand-in asks the warm process to fork; the forked child runs Flower's own
``flwr-simulation`` with the stand-in's arguments, environment and working directory. In
the child, the ClientApp's messages run in the child itself, one at a time (`WarmBackend`),
instead of on Ray actors: each message gets a copy of its message and context, as Ray's
transport gives it, and the base model and tokenized data stay cached across the run's
clients.

Each run is a fresh fork, so runs stay as independent as Flower's own processes keep them
(nothing a run loads or changes reaches the next), and a run that crashes leaves the warm
process serving. If the warm process cannot be reached, the stand-in runs Flower's own
``flwr-simulation`` instead. The stand-in ends when the child ends, with its exit status,
passes SIGTERM, SIGINT and SIGHUP on to it, and the child ends when the stand-in does.
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.server.superlink.fleet.vce.backend.backend import Backend

from fedlora.launch.processes import alive

__all__ = ["WarmBackend", "serve"]

# What every run imports: importing it once, in the warm process, is the point.
_WARM_IMPORTS = (
    "flwr.simulation.app",
    "flwr.server.superlink.fleet.vce.vce_api",
    "flwr.server.superlink.fleet.vce.backend.raybackend",
    "torch",
    "transformers",
    "peft",
    "flwr_datasets",  # and with it datasets, pandas, pyarrow, matplotlib
    "fedlora.client_app",
    "fedlora.server_app",
    "fedlora.client.setup",
    "fedlora.client.recipe",
    "fedlora.client.measure",
    "fedlora.server.loop",
    "fedlora.train.loops",
    "fedlora.models.loading",
)


def serve(socket_path: Path) -> None:
    """The warm process: import what runs need, then fork a simulation for each stand-in that asks."""
    import importlib  # noqa: PLC0415

    for name in _WARM_IMPORTS:
        importlib.import_module(name)
    # Forked children are reaped by the kernel; each reports its own exit status to its stand-in.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Only this user reaches it: the session's folder is private (mode 0700), and so is the socket.
    listener.bind(str(socket_path))
    os.chmod(socket_path, 0o600)
    listener.listen(16)
    print(f"warm: serving on {socket_path}", flush=True)
    while True:
        conn, _ = listener.accept()
        try:
            conn.settimeout(10)  # a caller that never sends its request holds up no later run
            request = json.loads(conn.makefile("r").readline())
            conn.settimeout(None)
        except (OSError, ValueError):
            conn.close()
            continue
        if os.fork() == 0:
            listener.close()
            _simulate(conn, request)  # never returns
        conn.close()


def _simulate(conn: socket.socket, request: dict[str, Any]) -> None:
    """In a forked child: run Flower's ``flwr-simulation`` as the stand-in was asked to, then exit."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = list(request["argv"])
        conn.sendall(f"{os.getpid()}\n".encode())
        _end_with(int(request["pid"]))
        _use_warm_backend()
        _flush_logs_without_waiting()
        _wake_on_stop()
        from flwr.simulation.app import flwr_simulation  # noqa: PLC0415 - imported in the warm process

        try:
            flwr_simulation()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):
                pass
        try:
            conn.sendall(f"{code}\n".encode())
        except OSError:
            pass
        os._exit(code)


def _end_with(pid: int) -> None:
    """End this child when the stand-in ``pid`` ends (killed, or its SuperExec gone)."""

    def watch() -> None:
        while alive(pid):  # a killed stand-in that its SuperExec has not reaped yet is gone too
            time.sleep(0.2)
        os._exit(143)

    threading.Thread(target=watch, name="stand-in-watch", daemon=True).start()


def _use_warm_backend() -> None:
    """Make Flower's simulation engine build a `WarmBackend` where it would build a Ray one."""
    from flwr.server.superlink.fleet.vce.backend import raybackend  # noqa: PLC0415

    raybackend.RayBackend = WarmBackend  # type: ignore[misc,assignment]


def _flush_logs_without_waiting() -> None:
    """Let the simulation's exit go on as soon as its logs are uploaded, not a second later.

    At exit, Flower's simulation waits for its log queue to empty and then sleeps a further
    second (`flush_logs`) so that the last upload lands before the run's result. Here the
    uploader thread is stopped instead: it uploads everything queued, then ends, and the
    exit waits for exactly that. A line logged after this point is not uploaded (in
    Flower's own order it would go after the run's result, when ``flwr run --stream`` may
    have stopped reading).
    """
    import flwr.simulation.app as simulation_app  # noqa: PLC0415 - imported in the warm process

    waiting = simulation_app.flush_logs

    def flush_logs(log_queue: Any, timeout: float = 3.0) -> bool:
        uploaders = [t for t in threading.enumerate() if t.name.endswith("(_log_uploader)")]
        if not uploaders:  # not the thread this was written for: Flower's own wait
            return bool(waiting(log_queue, timeout))
        log_queue.put(None)  # the uploader's signal to upload what is queued and end
        for uploader in uploaders:
            uploader.join(timeout)
        return not any(uploader.is_alive() for uploader in uploaders)

    simulation_app.flush_logs = flush_logs


def _wake_on_stop() -> None:
    """Let the simulation engine's threads end as soon as the run stops, not up to 1 s later.

    Flower's engine (`vce_api.run_api`) reads its message queues with ``get(timeout=1.0)``
    and looks at the run's stop event only between reads, so its last read holds up the
    run's end by up to a second. Here its queues wait in slices of 50 ms and end a wait
    once the stop event is set, as an empty read would.
    """
    import inspect  # noqa: PLC0415

    from flwr.server.superlink.fleet.vce import vce_api  # noqa: PLC0415 - imported in the warm process

    original = vce_api.run_api

    def run_api(*args: Any, **kwargs: Any) -> None:
        stop = inspect.signature(original).bind(*args, **kwargs).arguments["f_stop"]
        vce_api.Queue = _stop_aware_queue(stop)  # type: ignore[misc]
        original(*args, **kwargs)

    vce_api.run_api = run_api


def _stop_aware_queue(stop: threading.Event) -> type[queue.Queue[Any]]:
    """A `queue.Queue` whose timed ``get`` also ends, empty, once ``stop`` is set."""

    class StopAwareQueue(queue.Queue[Any]):
        def get(self, block: bool = True, timeout: float | None = None) -> Any:
            if not block or timeout is None:
                return super().get(block, timeout)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    return super().get(True, max(0.0, min(0.05, deadline - time.monotonic())))
                except queue.Empty:
                    if stop.is_set() or time.monotonic() >= deadline:
                        raise

    return StopAwareQueue


class WarmBackend(Backend):
    """Flower's simulation backend with one worker: the simulation process itself.

    Messages run one at a time, each on a copy of its message and context (Ray's transport
    copies them too, so a ClientApp never shares objects with the ServerApp).
    """

    def __init__(self, backend_config: dict[str, Any]) -> None:
        super().__init__(backend_config)
        self._app_fn: Callable[[], Any] | None = None
        self._busy = threading.Lock()

    def build(self, app_fn: Callable[[], Any]) -> None:
        """Keep the function that loads the ClientApp."""
        self._app_fn = app_fn

    @property
    def num_workers(self) -> int:
        """One: the process itself."""
        return 1

    def is_worker_idle(self) -> bool:
        """Whether no message is being processed."""
        return not self._busy.locked()

    def terminate(self) -> None:
        """Nothing to stop: the process ends with the run."""

    def process_message(self, message: Any, context: Any) -> tuple[Any, Any]:
        """Run the ClientApp on a copy of ``message`` and ``context``; return its reply and the context."""
        from flwr.clientapp.client_app import ClientAppException, LoadClientAppError  # noqa: PLC0415

        if self._app_fn is None:
            raise ValueError("WarmBackend: build() was not called before a message")
        with self._busy:
            message, context = pickle.loads(pickle.dumps((message, context)))
            try:
                app = self._app_fn()
                reply = app(message=message, context=context)
            except LoadClientAppError:
                raise
            except Exception as ex:
                raise ClientAppException(str(ex)) from ex
            return pickle.loads(pickle.dumps(reply)), context


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
