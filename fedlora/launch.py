"""Launching a simulated federation with `flwr run`, offline, and cleaning up after it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig, Scalar
from fedlora.core.errors import ConfigError, DataError, FedloraError, RunInterrupted
from fedlora.core.rundir import CHECKPOINT, ERROR_LINE, METRICS, SUMMARY, read_summary
from fedlora.data import DATASETS
from fedlora.data.federated import validate_data
from fedlora.data.jsonl import SPLITS
from fedlora.models import TEST_MODELS, check_model, model_source
from fedlora.models.device import check_compute
from fedlora.server.runs_root import RUNS_ROOT_ENV, held_run

__all__ = [
    "FLOWER_ENV",
    "FlowerSession",
    "check_gpus",
    "flower_env",
    "flower_script",
    "flower_session",
    "last_error",
    "parse_overrides",
    "preflight",
    "refuse_finished_run",
    "simulate",
    "toml_value",
    "write_app",
    "write_run_config",
]

log = logging.getLogger(__name__)

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


def parse_overrides(text: str) -> dict[str, Scalar]:
    """Parse ``"k=v k2=v2"`` (TOML values; bare words are strings) into a flat dict.

    Raises
    ------
    ConfigError
        On a token without ``=``.

    """
    flat: dict[str, Scalar] = {}
    for token in text.split():
        key, sep, raw = token.partition("=")
        if not sep or not key:
            raise ConfigError(f"run-config: expected key=value, got {token!r}")
        try:
            flat[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            flat[key] = raw
    return flat


def toml_value(value: Scalar) -> str:
    """``value`` as a TOML value (strings quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


_RAY_ADDRESS = re.compile(r"auto|(ray://)?[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}")


def _whole(value: float) -> float | int:
    # Flower wants an integer where the value is whole (num-cpus=1, not 1.0).
    return int(value) if float(value).is_integer() else value


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


def write_run_config(path: Path, cfg: RunConfig) -> Path:
    """Write ``cfg`` as a TOML file for ``flwr run --run-config``."""
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in cfg.to_flat().items()))
    return path


def write_app(directory: Path, cfg: RunConfig) -> Path:
    """Write a Flower app folder (just a pyproject) whose components are fedlora's apps.

    The config section lists every run-config key, with ``cfg``'s values as defaults.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "fedlora-run"',
        'version = "0.1.0"',
        "dependencies = []",
        "",
        "[tool.hatch.build.targets.wheel]",
        'packages = ["."]',
        "",
        "[tool.flwr.app]",
        'publisher = "fedlora"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fedlora.server_app:app"',
        'clientapp = "fedlora.client_app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {toml_value(value)}" for key, value in cfg.to_flat().items()),
    ]
    (directory / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return directory


def preflight(cfg: RunConfig, num_clients: int) -> RunConfig:
    """Check model and every client's data before anything starts; fill in the label set.

    Raises
    ------
    FedloraError
        The first problem found, in one line naming the field or path.

    """
    from fedlora import plan  # noqa: PLC0415 - heavy: the method registries import torch

    plan.resolve(cfg)
    if num_clients <= 0:
        raise ConfigError(f"clients: must be a positive integer, got {num_clients}")
    check_model(cfg.model)
    if cfg.model.model in TEST_MODELS:
        log.warning(
            "model=%s is a test model with random weights: it learns next to nothing in a few steps, "
            "so strategies and methods compared on it look alike; compare on minilm or smollm2",
            cfg.model.model,
        )
    model = cfg.model
    plain = (model.precision, model.base_dtype, model.quantization) == ("fp32", "float32", "none")
    if not (plain and model.device in ("auto", "cpu")):
        # Only a device or format named outright can be missing (this check imports torch).
        check_compute(model)
    if cfg.model.task == "chat":
        _check_chat(cfg)
    labels = validate_data(cfg.data, cfg.model.task, num_clients, cfg.federation.data_seed)
    if cfg.model.task == "classification" and len(labels) < 2:
        raise DataError(
            f"labels: classification needs at least 2 labels, the data has {len(labels)} "
            f"({', '.join(labels) or 'none'}); use task=causal-lm for text without classes"
        )
    return cfg.replace(labels=",".join(labels)) if labels and not cfg.data.labels else cfg


def check_layout(cfg: RunConfig, out_dir: Path) -> None:
    """Refuse a ``data-dir`` that is one client's folder, and a run directory inside the data.

    Raises
    ------
    FedloraError
        In one line, naming the folder.

    """
    if not cfg.data.data_dir:
        return
    root = Path(cfg.data.data_dir).expanduser().resolve()
    if any((root / f"{split}.jsonl").is_file() for split in SPLITS):
        raise DataError(
            f"data-dir: {root} holds train.jsonl and test.jsonl itself, one client's data; a simulation "
            "needs one subfolder per client (DIR/<client>/train.jsonl, DIR/<client>/test.jsonl)"
        )
    if out_dir == root or root in out_dir.parents:
        raise ConfigError(
            f"out: {out_dir} is inside the data folder {root}, where the next run would read it as a "
            "client; choose a folder outside it"
        )


def _check_chat(cfg: RunConfig) -> None:
    """Chat needs chat records and a template to render them with."""
    from transformers import AutoTokenizer  # noqa: PLC0415 - heavy: transformers

    from fedlora.train.chat import template_for  # noqa: PLC0415 - heavy: torch

    # data-dir and hf: datasets are checked record by record as they load.
    if not cfg.data.data_dir and not cfg.data.hf_dataset and not DATASETS.get(cfg.data.dataset).chat:
        raise ConfigError(
            "task: chat reads conversations or prompt-completion records from data-dir or an hf: dataset; "
            f"the bundled dataset {cfg.data.dataset!r} holds plain text"
        )
    template_for(
        AutoTokenizer.from_pretrained(model_source(cfg.model.model)), cfg.model.chat_template, cfg.model.model
    )


def check_gpus(gpus_per_client: float, *, cluster: bool = False) -> None:
    """Refuse a GPU share per simulated client that this machine (or any machine) cannot give.

    ``cluster``: the simulation runs on a Ray cluster, whose GPUs Ray counts; only the
    value itself is checked here.

    Raises
    ------
    ConfigError
        Naming ``gpus-per-client``, what it got, and the GPUs there are.

    """
    if not 0 <= gpus_per_client <= 64:
        raise ConfigError(f"gpus-per-client: must be a number in [0, 64], got {gpus_per_client!r}")
    if gpus_per_client == 0 or cluster:
        return
    import torch  # noqa: PLC0415 - heavy: torch, only when GPUs are asked for

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus_per_client > count:
        raise ConfigError(
            f"gpus-per-client: {gpus_per_client:g} GPUs per client asked for, and this machine has {count} "
            f"CUDA GPU(s); use at most {count}" + (" (fractions share one GPU, e.g. 0.25)" if count else "")
        )


def refuse_finished_run(out_dir: Path) -> None:
    """Refuse to start a new run in ``out_dir`` when that would lose an earlier one.

    Raises
    ------
    ConfigError
        If ``out_dir`` holds a finished run (``summary.json``) or a resumable one (a checkpoint).

    """
    held = held_run(out_dir)
    if held == "finished":
        raise ConfigError(
            f"out: {out_dir} holds a finished run; choose another folder, pass --overwrite "
            "(overwrite=True) to replace it, or `fedlora resume` to add rounds"
        )
    if held == "unfinished":
        raise ConfigError(
            f"out: {out_dir} holds an unfinished run; go on with `fedlora resume {out_dir}`, or pass "
            "--overwrite (overwrite=True) to start afresh"
        )


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    # SIGTERM (a supervisor, a closed terminal) stops the run like Ctrl-C does.
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_flower(flwr_home: Path, *, everything: bool = False, since: float | None = None) -> None:
    """Stop the SuperLink/SuperExec that `flwr run` started for this FLWR_HOME.

    With ``everything``, every process of the run goes: `flwr run`, the simulation that
    runs the ServerApp and its Ray workers too (they all inherit the run's FLWR_HOME);
    the sweep is repeated until none is left, since a dying parent may start a last child.
    ``since`` (seconds since boot, `_uptime`) spares processes started before it: a
    session's own Ray, which outlives an interrupted run.
    """
    for _ in range(5 if everything else 1):
        stopped = _signal_run(flwr_home, everything=everything, since=since)
        if not stopped:
            return
        deadline = time.monotonic() + 10
        for pid in stopped:
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    # A process that exited but was not yet reaped by its parent (a zombie) is gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _uptime() -> float:
    # Seconds since boot: the clock of /proc/<pid>/stat's start times.
    try:
        return float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def _started(proc: Path) -> float:
    # When a process started, in seconds since boot (field 22 of /proc/<pid>/stat).
    fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _signal_run(flwr_home: Path, *, everything: bool, since: float | None = None) -> list[int]:
    # SIGTERM to the processes of this FLWR_HOME (only Flower's servers unless ``everything``;
    # only those started at or after ``since`` if given).
    marker = f"FLWR_HOME={flwr_home}".encode()
    stopped: list[int] = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int(proc.name) == os.getpid():
                continue
            cmdline = (proc / "cmdline").read_bytes()
            if not everything and b"flower-super" not in cmdline:
                continue
            if since is not None and _started(proc) < since:
                continue
            if marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            os.kill(int(proc.name), signal.SIGTERM)
            stopped.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return stopped


def _events(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class FlowerSession:
    """A private Flower home and ports, whose local SuperLink serves several runs in turn.

    `flwr run` starts its local SuperLink on fixed ports unless told otherwise, and reuses
    whatever SuperLink answers there: each session picks free ports of its own so that
    concurrent runs (two sweeps, a test beside a demo) never share or stop each other's.
    """

    root: Path
    http_port: int = field(default_factory=_free_port)
    control_port: int = field(default_factory=_free_port)
    # An existing Ray cluster (`ray start`) the simulation runs on, else a Ray of its own.
    ray_address: str = ""
    # The session started that Ray itself (`warm_ray`): it lives on this machine, and as long as the session.
    ray_owned: bool = False

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
        """Environment variables that point `flwr run` at this session's SuperLink."""
        return {
            RUNS_ROOT_ENV: str(self.runs),
            "FLWR_HOME": str(self.home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(self.control_port),
            # Flower's simulation calls ray.init(), which joins the cluster RAY_ADDRESS names.
            **({"RAY_ADDRESS": self.ray_address} if self.ray_address else {}),
        }


@contextlib.contextmanager
def flower_session(ray_address: str = "", *, warm_ray: bool = False) -> Iterator[FlowerSession]:
    """Let several `simulate` calls share one local SuperLink, stopped when the block ends.

    Saves the SuperLink's start-up (several seconds) on every run after the first; runs
    stay independent (each has its own run id, config and results). ``ray_address``: run
    the simulations on that existing Ray cluster (``HOST:PORT`` of its head, or ``auto``).
    ``warm_ray`` (without ``ray_address``): start a Ray of the session's own on this
    machine, which every run joins instead of starting and stopping one (Flower's
    simulation otherwise does both, about 10 s a run on 2 cores); the session stops it.
    Its workers take the environment of the moment the session starts.
    """
    with tempfile.TemporaryDirectory(prefix="fedlora-", ignore_cleanup_errors=True) as tmp:
        session = FlowerSession(Path(tmp), ray_address=ray_address)
        try:
            if warm_ray and not ray_address:
                session = dataclasses.replace(session, ray_address=_start_ray(session), ray_owned=True)
            yield session
        finally:
            _stop_flower(session.home, everything=session.ray_owned)


def _start_ray(session: FlowerSession) -> str:
    """Start a Ray head for ``session`` (its processes carry the session's FLWR_HOME) and return its address.

    A private temporary folder keeps it apart from any other Ray on the machine: a run outside
    the session never joins it by accident.
    """
    port = _free_port()
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
        subprocess.run(command, env=flower_env(session.env()), capture_output=True, check=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        detail = (
            err.stderr.decode(errors="replace").strip().splitlines()[-1:]
            if isinstance(err, subprocess.CalledProcessError) and err.stderr
            else [type(err).__name__]
        )
        _stop_flower(session.home, everything=True)
        raise FedloraError(
            f"warm-ray: could not start Ray for the session ({detail[0] if detail else err})"
        ) from None
    return f"127.0.0.1:{port}"


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
    if not cpus_per_client > 0:
        raise ConfigError(f"cpus-per-client: must be a positive number, got {cpus_per_client!r}")
    if ray_address and not _RAY_ADDRESS.fullmatch(ray_address):
        raise ConfigError(
            f"ray-address: must be auto or HOST:PORT of a Ray head (ray start --head), got {ray_address!r}"
        )
    if session is not None and ray_address and ray_address != session.ray_address:
        raise ConfigError(
            f"ray-address: the session runs on {session.ray_address or 'its own Ray'}, got {ray_address!r}; "
            "give it to flower_session(ray_address=...)"
        )
    elsewhere = session is not None and session.ray_address and not session.ray_owned
    check_gpus(gpus_per_client, cluster=bool(ray_address or elsewhere))
    check_layout(cfg, out_dir)
    if not cfg.federation.resume and not overwrite:
        refuse_finished_run(out_dir)
    cfg = preflight(cfg, num_clients)
    cfg = cfg.replace(out_dir=str(out_dir), min_clients=num_clients)
    if not cfg.federation.client_state_dir:
        # Simulated clients keep their personal state in the run directory; a fresh run starts clean.
        cfg = cfg.replace(client_state_dir=str(out_dir / "clients"))
        if not cfg.federation.resume:
            shutil.rmtree(out_dir / "clients", ignore_errors=True)
    if cfg.federation.resume:
        from fedlora.server.checkpoint import load_checkpoint  # noqa: PLC0415 - heavy: torch, Flower's server runtime
        from fedlora.server.loop import build_strategy  # noqa: PLC0415 - heavy: torch, Flower's server runtime

        # Fail here, before Flower starts, on a missing or altered checkpoint or a changed config.
        checkpoint = load_checkpoint(out_dir, {**cfg.to_flat(), "labels": ",".join(cfg.data.labels)})
        build_strategy(cfg, checkpoint, lambda: num_clients)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"out: cannot create {out_dir} ({err.strerror or err})") from None
    for stale in (SUMMARY,) if cfg.federation.resume else (SUMMARY, METRICS):
        (out_dir / stale).unlink(missing_ok=True)
    if not cfg.federation.resume:
        shutil.rmtree(out_dir / CHECKPOINT, ignore_errors=True)  # --overwrite: the old run's checkpoint too
    with contextlib.ExitStack() as stack:
        if session is None:
            session = stack.enter_context(flower_session(ray_address))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="run-", dir=session.root)))
        # The ServerApp writes only inside the session's runs folder: link this run's directory there.
        session.runs.mkdir(exist_ok=True)
        link = session.runs / tmp.name
        link.symlink_to(out_dir, target_is_directory=True)
        stack.callback(link.unlink, missing_ok=True)
        app = app_dir.resolve() if app_dir is not None else write_app(tmp / "app", RunConfig())
        overrides = write_run_config(tmp / "run-config.toml", cfg.replace(out_dir=link.name))
        env = flower_env({**session.env(), **(extra_env or {})})
        command = [
            flower_script("flwr"),
            "run",
            str(app),
            "--stream",
            "--run-config",
            str(overrides),
            "--federation-config",
            f"num-supernodes={num_clients} client-resources-num-cpus={toml_value(_whole(cpus_per_client))}"
            + (f" client-resources-num-gpus={toml_value(float(gpus_per_client))}" if gpus_per_client else ""),
        ]
        seen = 0
        began = _uptime()
        with (out_dir / "flwr.log").open("w") as logfile:
            # The SuperLink that `flwr run` starts inherits this working directory: the session's.
            proc = subprocess.Popen(
                command, env=env, stdout=logfile, stderr=subprocess.STDOUT, cwd=session.root
            )
            try:
                with _terminate_as_interrupt():
                    while proc.poll() is None:
                        time.sleep(0.2)
                        events, seen = _events(out_dir / METRICS, seen)
                        for event in events:
                            if on_event:
                                on_event(event)
            except KeyboardInterrupt:
                # Every process of the run, Ray's workers too: none may go on writing results. A
                # session's own Ray, started before the run, stays for the session's next runs.
                _stop_flower(session.home, everything=True, since=began if session.ray_owned else None)
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
                    _stop_flower(session.home)  # a failed run may leave Flower in a bad state
        events, seen = _events(out_dir / METRICS, seen)
        for event in events:
            if on_event:
                on_event(event)
    summary_path = out_dir / SUMMARY
    if not summary_path.exists():
        raise FedloraError(
            f"the federation did not finish: {last_error(out_dir / 'flwr.log')} (log: {out_dir / 'flwr.log'})"
        )
    return read_summary(out_dir)


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
