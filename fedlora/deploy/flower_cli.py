"""The operator's side through the ``flwr`` CLI: connections, node registration, runs."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import tempfile
import tomllib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError, FedloraError
from fedlora.core.rundir import ERROR_LINE, RESULTS_LINE, SUMMARY, read_summary
from fedlora.deploy.commands import _ANSI
from fedlora.deploy.operator_token import OPERATOR_TOKEN, write_operator_credentials
from fedlora.launch import flower_env, flower_script, toml_value, write_app, write_run_config

__all__ = ["DEFAULT_FLWR_HOME", "Submitted", "register_node", "submit", "unregister_node", "write_flwr_home"]

DEFAULT_FLWR_HOME = Path("~/.fedlora/flwr-home")

_NODES_FILE = "fedlora-nodes.json"


def _connection_name(superlink: str) -> str:
    return "fedlora-" + re.sub(r"[^A-Za-z0-9_-]", "-", superlink)


def write_flwr_home(
    home: Path,
    superlink: str,
    *,
    root_cert: Path | None = None,
    insecure: bool = False,
    token: str | None = None,
) -> str:
    """Add a ``[superlink.NAME]`` connection for ``superlink`` to ``home/config.toml``; return NAME.

    The `flwr` CLI (``flwr run``, ``flwr supernode register``) reads its connections from
    ``$FLWR_HOME/config.toml``; the new one becomes the default. Other fedlora connections
    in the file are kept. With ``token``, the CLI sends the operator's token to that
    SuperLink on every Control API call (`write_operator_credentials`).

    Parameters
    ----------
    home : Path
        The Flower home (made if missing).
    superlink : str
        The SuperLink's ``host:port``.
    root_cert : Path or None
        The federation's CA certificate.
    insecure : bool
        Connect without TLS.
    token : str or None
        The operator token; None: the CLI sends none (fedlora's SuperLink then refuses it).

    Returns
    -------
    str
        The connection's name.

    Raises
    ------
    ConfigError
        Without ``root_cert`` unless ``insecure``.

    """
    if root_cert is None and not insecure:
        raise ConfigError("root-cert: the CA certificate (ca.crt) is needed, or --insecure")
    home = home.expanduser().resolve()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = home / "config.toml"
    existing: dict[str, Any] = tomllib.loads(path.read_text()).get("superlink", {}) if path.exists() else {}
    name = _connection_name(superlink)
    entry: dict[str, str | bool] = {"address": superlink}
    if insecure:
        entry["insecure"] = True
    else:
        assert root_cert is not None
        entry["root-certificates"] = str(root_cert.expanduser().resolve())
    connections = {
        k: v
        for k, v in existing.items()
        if isinstance(v, dict) and all(not isinstance(x, dict) for x in v.values())
    }
    connections[name] = entry
    lines = ["[superlink]", f"default = {toml_value(name)}"]
    for conn, values in connections.items():
        lines += ["", f"[superlink.{conn}]", *(f"{k} = {toml_value(v)}" for k, v in values.items())]
    path.write_text("\n".join(lines) + "\n")
    if token is not None:
        write_operator_credentials(home, superlink, token)
    return name


def _flwr(args: Sequence[str], home: Path, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [flower_script("flwr"), *args],
        env=flower_env({"FLWR_HOME": str(home.expanduser().resolve()), "COLUMNS": "200"}),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _json_tail(stdout: str) -> dict[str, Any]:
    """The JSON object `flwr ... --format json` printed last."""
    start = stdout.rfind("\n{")
    try:
        value = json.loads(stdout[start + 1 :] if start >= 0 else stdout)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _flwr_error(proc: subprocess.CompletedProcess[str]) -> str:
    answer = _json_tail(proc.stdout)
    message = str(answer.get("error-message") or _ANSI.sub("", proc.stderr or proc.stdout))
    # `flwr` starts its messages with the connection it used: the caller knows it.
    kept = [line for line in message.splitlines() if not line.startswith("Using SuperLink:")]
    return _token_hint(" ".join(" ".join(kept).split())[-400:] or f"exit code {proc.returncode}")


def _token_hint(answer: str) -> str:
    """Flower's answer, with what its advice to run ``flwr login`` means for fedlora."""
    if "Authentication failed" not in answer:
        return answer
    return (
        "the SuperLink refused this caller: not the operator's token (give --token-file, the "
        f"{OPERATOR_TOKEN} that `fedlora certs` or `fedlora server` wrote) [{answer}]"
    )


def _public_key(path: Path) -> str:
    """``type base64`` of an OpenSSH public key file (the comment dropped)."""
    try:
        return " ".join(path.expanduser().read_text().split()[:2])
    except OSError as err:
        raise FedloraError(f"key: cannot read {path}: {err.strerror}") from None


def register_node(public_key: Path, superlink: str, *, home: Path) -> int:
    """Register a SuperNode's public key with ``superlink`` (``flwr supernode register``).

    The node id is recorded in ``home``, so that `unregister_node` can be given the key file.

    Parameters
    ----------
    public_key : Path
        The node's ``.pub`` file (`fedlora.deploy.make_node_key`).
    superlink : str
        The SuperLink's ``host:port``.
    home : Path
        A Flower home with a connection for ``superlink`` (`write_flwr_home`).

    Returns
    -------
    int
        The node id the SuperLink gave the key.

    Raises
    ------
    FedloraError
        With Flower's answer, if the SuperLink refuses (a key already in use, no TLS, ...).

    """
    key = _public_key(public_key)
    conn = _connection_name(superlink)
    proc = _flwr(
        ["supernode", "register", str(public_key.expanduser().resolve()), conn, "--format", "json"], home
    )
    node_id = _json_tail(proc.stdout).get("node-id")
    if proc.returncode != 0 or node_id is None:
        raise FedloraError(f"register: {public_key}: {_flwr_error(proc)}")
    nodes_file = home.expanduser().resolve() / _NODES_FILE
    nodes = json.loads(nodes_file.read_text()) if nodes_file.exists() else {}
    nodes.setdefault(conn, {})[key] = int(node_id)
    nodes_file.write_text(json.dumps(nodes, indent=2))
    return int(node_id)


def unregister_node(node: Path | int, superlink: str, *, home: Path) -> int:
    """Revoke a SuperNode (by node id, or by the public key `register_node` registered).

    A running node with that key is disconnected.

    Parameters
    ----------
    node : Path or int
        The node's ``.pub`` file, or its node id.
    superlink : str
        The SuperLink's ``host:port``.
    home : Path
        A Flower home with a connection for ``superlink`` (`write_flwr_home`).

    Returns
    -------
    int
        The node id.

    Raises
    ------
    FedloraError
        If the key was not registered through this Flower home, or the SuperLink refuses.

    """
    conn = _connection_name(superlink)
    if isinstance(node, Path):
        nodes_file = home.expanduser().resolve() / _NODES_FILE
        nodes = json.loads(nodes_file.read_text()) if nodes_file.exists() else {}
        found = nodes.get(conn, {}).get(_public_key(node))
        if found is None:
            raise FedloraError(
                f"unregister: no node id recorded for {node} at {superlink}; give the node id "
                "that `fedlora register` printed instead"
            )
        node_id = int(found)
    else:
        node_id = node
    proc = _flwr(["supernode", "unregister", str(node_id), conn, "--format", "json"], home)
    if proc.returncode != 0 or _json_tail(proc.stdout).get("success") is False:
        raise FedloraError(f"unregister: node {node_id}: {_flwr_error(proc)}")
    return node_id


@contextlib.contextmanager
def _home(home: Path | None) -> Iterator[Path]:
    if home is not None:
        yield home.expanduser().resolve()
        return
    with tempfile.TemporaryDirectory(prefix="fedlora-flwr-") as tmp:
        yield Path(tmp)


@dataclass(frozen=True)
class Submitted:
    """A finished deployed run: where its ServerApp wrote it, and its summary if readable here."""

    run_dir: Path | None
    summary: dict[str, Any] | None


def submit(
    cfg: RunConfig,
    superlink: str,
    *,
    clients: int,
    out: str,
    root_cert: Path | None = None,
    insecure: bool = False,
    token: str | None = None,
    home: Path | None = None,
    echo: Callable[[str], None] | None = None,
) -> Submitted:
    """Start a run on a deployed SuperLink with ``flwr run``, wait for it, say where its results are.

    Parameters
    ----------
    cfg : RunConfig
        The run's configuration; its ``out_dir`` and ``min_clients`` are replaced.
    superlink : str
        The SuperLink's ``host:port``.
    clients : int
        The nodes the ServerApp waits for (``min-clients``).
    out : str
        The run directory on the SuperLink's machine: a folder inside the server's runs
        folder (`fedlora server --runs-dir`), by name or by absolute path.
    root_cert : Path or None
        The federation's CA certificate.
    insecure : bool
        Connect without TLS.
    token : str or None
        The operator token, which fedlora's SuperLink requires to start a run.
    home : Path or None
        A Flower home to write the connection to; None: a private temporary one.
    echo : callable or None
        Gets the run's streamed log line by line.

    Returns
    -------
    Submitted
        The run directory on the SuperLink's machine (as its ServerApp named it), and its
        ``summary.json`` if that folder can be read from here.

    Raises
    ------
    FedloraError
        On a bad configuration (before anything is sent), or if the run fails.

    """
    if clients <= 0:
        raise ConfigError(f"clients: must be a positive integer, got {clients}")
    if cfg.model.task == "classification" and not cfg.data.labels and not cfg.data.data_dir:
        # The devices' data never reaches the server: it cannot infer the label set.
        raise ConfigError(
            'labels: a deployed classification run needs them, e.g. --run-config "labels=a,b,c"'
        )
    cfg = cfg.replace(out_dir=out, min_clients=clients)
    run_dir: Path | None = None
    with _home(home) as flwr_home, tempfile.TemporaryDirectory(prefix="fedlora-submit-") as tmp:
        conn = write_flwr_home(flwr_home, superlink, root_cert=root_cert, insecure=insecure, token=token)
        app = write_app(Path(tmp) / "app", RunConfig())
        overrides = write_run_config(Path(tmp) / "run-config.toml", cfg)
        command = [flower_script("flwr"), "run", str(app), conn, "--stream", "--run-config", str(overrides)]
        env = flower_env({"FLWR_HOME": str(flwr_home), "COLUMNS": "200"})
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        run_id: int | None = None
        tail: deque[str] = deque(maxlen=40)
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line)
            if echo:
                echo(line)
            if run_id is None and (found := re.search(r"Successfully started run (\d+)", line)):
                run_id = int(found.group(1))
            if run_dir is None and (found := re.search(f"{RESULTS_LINE} (.+)$", line.rstrip())):
                run_dir = Path(found.group(1))
        code = proc.wait()
        status = _run_status(run_id, conn, flwr_home) if run_id is not None else None
    if code != 0 or run_id is None:
        box = " ".join(line.strip("│ \n") for line in tail if line.startswith("│"))
        answer = box or _ANSI.sub("", "".join(tail))[-300:]
        raise FedloraError(f"submit: the run did not start: {_token_hint(answer)}")
    if status is not None and not status.startswith("finished:completed"):
        failed = [line for line in tail if ERROR_LINE in line]
        reason = failed[-1].split(ERROR_LINE, 1)[1].strip() if failed else "its log was streamed above"
        raise FedloraError(f"submit: run {run_id} ended {status}: {_ANSI.sub('', reason)}")
    finished = run_dir is not None and (run_dir / SUMMARY).exists()
    return Submitted(run_dir, read_summary(run_dir) if finished and run_dir is not None else None)


def _run_status(run_id: int, conn: str, home: Path) -> str | None:
    """``status`` of a run as `flwr list` reports it, with its details if any."""
    proc = _flwr(["list", "--run-id", str(run_id), conn, "--format", "json"], home)
    runs = _json_tail(proc.stdout).get("runs") or []
    if not runs:
        return None
    details = str(runs[0].get("status-details") or "N/A")
    return str(runs[0].get("status")) + ("" if details == "N/A" else f": {details}")
