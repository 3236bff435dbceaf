"""One simulated run: ``flwr run`` in a session, its events as they come, and its summary or its error."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError, FedloraError, RunInterrupted
from fedlora.core.rundir import CHECKPOINT, ERROR_LINE, METRICS, SUMMARY, read_summary
from fedlora.launch.appfiles import toml_value, whole, write_app, write_run_config
from fedlora.launch.checks import check_gpus, check_layout, preflight, refuse_finished_run
from fedlora.launch.processes import flower_env, flower_script, stop_flower, terminate_as_interrupt, uptime
from fedlora.launch.session import FlowerSession, check_ray_address, flower_session
from fedlora.server.resumable import check_resumable

__all__ = ["last_error", "read_events", "simulate"]


def simulate(
    cfg: RunConfig,
    *,
    num_clients: int,
    out_dir: Path,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    ray_address: str = "",
    on_event: Callable[[dict[str, Any]], None] | None = None,
    extra_env: Mapping[str, str] | None = None,
    app_dir: Path | None = None,
    session: FlowerSession | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run a simulated federation through `flwr run` and return its ``summary.json``.

    An ``out_dir`` that holds a finished run, or an unfinished one that could be resumed,
    is refused unless ``overwrite`` (or the config's ``resume``): nothing in it is touched
    before the checks pass. SIGINT or SIGTERM stops every process of the run and raises
    `RunInterrupted`, which says how to resume.

    A private ``FLWR_HOME`` keeps runs apart from any other Flower use; the SuperLink
    that `flwr run` starts is stopped when the run ends, whatever the outcome, unless the
    run belongs to a `flower_session` (which stops it when the session ends). ``app_dir``
    is the Flower app to run (default: a generated one; the repository root works too):
    the whole configuration is passed as ``--run-config``, so its defaults do not matter.

    Raises
    ------
    FedloraError
        If the configuration or data is bad (before anything starts) or the run fails.

    """
    out_dir = out_dir.expanduser().resolve()
    _check_resources(cpus_per_client, gpus_per_client, ray_address, session)
    check_layout(cfg, out_dir)
    if not cfg.federation.resume and not overwrite:
        refuse_finished_run(out_dir)
    cfg = _prepared(preflight(cfg, num_clients), out_dir, num_clients)
    with contextlib.ExitStack() as stack:
        if session is None:
            session = stack.enter_context(flower_session(ray_address))
        resources = (num_clients, cpus_per_client, gpus_per_client)
        command, env = _flwr_run(stack, session, cfg, out_dir, resources, app_dir)
        _watch(command, {**env, **(extra_env or {})}, session, out_dir, on_event)
    if not (out_dir / SUMMARY).exists():
        raise FedloraError(
            f"the federation did not finish: {last_error(out_dir / 'flwr.log')} (log: {out_dir / 'flwr.log'})"
        )
    return read_summary(out_dir)


def _check_resources(
    cpus_per_client: float, gpus_per_client: float, ray_address: str, session: FlowerSession | None
) -> None:
    """Refuse a CPU or GPU share, or a Ray address, that cannot work (one line each)."""
    if not cpus_per_client > 0:
        raise ConfigError(f"cpus-per-client: must be a positive number, got {cpus_per_client!r}")
    check_ray_address(ray_address)
    if session is not None and ray_address and ray_address != session.ray_address:
        runs_on = "its warm process, with no Ray" if session.backend == "warm" else "its own Ray"
        raise ConfigError(
            f"ray-address: the session runs on {session.ray_address or runs_on}, got {ray_address!r}; "
            "give the address to the session (fedlora.session(ray_address=...)) instead"
        )
    elsewhere = session is not None and bool(session.ray_address)  # a cluster, not a Ray of the session's own
    check_gpus(gpus_per_client, cluster=bool(ray_address or elsewhere))


def _prepared(cfg: RunConfig, out_dir: Path, num_clients: int) -> RunConfig:
    """The run's final configuration, with its run directory ready (a resume checked first).

    Nothing in ``out_dir`` is touched before every check has passed.
    """
    cfg = cfg.replace(out_dir=str(out_dir), min_clients=num_clients)
    fresh = not cfg.federation.resume
    own_state = not cfg.federation.client_state_dir
    if own_state:
        # Simulated clients keep their personal state in the run directory.
        cfg = cfg.replace(client_state_dir=str(out_dir / "clients"))
    if not fresh:
        # Fail here, before Flower starts, on a missing or foreign checkpoint or a changed config,
        # from the checkpoint's header; the ServerApp loads its arrays and strategy state once.
        check_resumable(out_dir, {**cfg.to_flat(), "labels": ",".join(cfg.data.labels)})
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"out: cannot create {out_dir} ({err.strerror or err})") from None
    for stale in (SUMMARY, METRICS) if fresh else (SUMMARY,):
        (out_dir / stale).unlink(missing_ok=True)
    if fresh:
        # A fresh run starts clean: --overwrite drops the old run's checkpoint and client state too.
        shutil.rmtree(out_dir / CHECKPOINT, ignore_errors=True)
        if own_state:
            shutil.rmtree(out_dir / "clients", ignore_errors=True)
    return cfg


def _flwr_run(
    stack: contextlib.ExitStack,
    session: FlowerSession,
    cfg: RunConfig,
    out_dir: Path,
    resources: tuple[int, float, float],
    app_dir: Path | None,
) -> tuple[list[str], dict[str, str]]:
    """The ``flwr run`` command of this run in ``session``, and its environment.

    ``resources``: clients, CPUs and GPUs per client. The ServerApp writes only inside the
    session's runs folder: the run directory is linked there for as long as ``stack`` is open.
    """
    num_clients, cpus_per_client, gpus_per_client = resources
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="run-", dir=session.root)))
    session.runs.mkdir(exist_ok=True)
    link = session.runs / tmp.name
    link.symlink_to(out_dir, target_is_directory=True)
    stack.callback(link.unlink, missing_ok=True)
    app = app_dir.resolve() if app_dir is not None else write_app(tmp / "app", RunConfig())
    overrides = write_run_config(tmp / "run-config.toml", cfg.replace(out_dir=link.name))
    cpus = toml_value(whole(cpus_per_client))
    federation = f"num-supernodes={num_clients} client-resources-num-cpus={cpus}"
    if gpus_per_client:
        federation += f" client-resources-num-gpus={toml_value(float(gpus_per_client))}"
    command = [
        flower_script("flwr"),
        *("run", str(app), "--stream", "--run-config", str(overrides), "--federation-config", federation),
    ]
    return command, flower_env(session.env())


def _watch(
    command: list[str],
    env: dict[str, str],
    session: FlowerSession,
    out_dir: Path,
    on_event: Callable[[dict[str, Any]], None] | None,
) -> None:
    """Run ``command`` to its end, passing the run's events on as they come.

    SIGINT or SIGTERM stops every process of the run (not a session's own Ray, started
    before it) and raises `RunInterrupted`; a failed run stops the session's servers.
    """

    def emit(seen: int) -> int:
        events, seen = read_events(out_dir / METRICS, seen)
        for event in events:
            if on_event:
                on_event(event)
        return seen

    seen, began = 0, uptime()
    with (out_dir / "flwr.log").open("w") as logfile:
        # The SuperLink that `flwr run` starts inherits this working directory: the session's.
        proc = subprocess.Popen(command, env=env, stdout=logfile, stderr=subprocess.STDOUT, cwd=session.root)
        try:
            with terminate_as_interrupt():
                while proc.poll() is None:
                    time.sleep(0.2)
                    seen = emit(seen)
        except KeyboardInterrupt:
            # Every process of the run, Ray's workers too: none may go on writing results.
            stop_flower(session.home, everything=True, since=began if session.outlives_runs else None)
            proc.wait(timeout=30)
            raise RunInterrupted(
                f"interrupted: the run in {out_dir} was stopped; go on from its last checkpoint "
                f"with `fedlora resume {out_dir}`",
                where="interrupted",
            ) from None
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)
            if proc.returncode != 0 or not (out_dir / SUMMARY).exists():
                stop_flower(session.home)  # a failed run may leave Flower in a bad state
    emit(seen)


def read_events(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The events of ``metrics.jsonl`` after byte ``offset``, and the offset to read on from.

    Only what is new is read, so polling costs the same late in a long run as early; a
    line still being written waits for the next call.
    """
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
    except FileNotFoundError:
        return [], offset
    complete = chunk[: chunk.rfind(b"\n") + 1]
    lines = complete.decode("utf-8").split("\n")
    return [json.loads(line) for line in lines if line.strip()], offset + len(complete)


def last_error(log_path: Path) -> str:
    """The line of a Flower log that says why a run failed (the ServerApp's own, if it wrote one)."""
    lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
    # The ServerApp names its own failure in one line (`fedlora.server_app`).
    for line in reversed(lines):
        if ERROR_LINE in line:
            return line[line.index(ERROR_LINE) + len(ERROR_LINE) :].strip()[-300:]
    # `flwr` prints its own errors in a box: return the box's text.
    box = [line.strip("│ ") for line in lines if line.startswith("│")]
    if box:
        return " ".join(part for part in box if part)[-300:]
    for line in reversed(lines):
        stripped = line.strip()
        if stripped and ("Error" in stripped or "error" in stripped) and not stripped.startswith("File "):
            return stripped[-300:]
    return "no summary was written"
