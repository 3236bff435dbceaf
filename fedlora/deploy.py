"""A real federation: certificates, node keys, SuperLink and SuperNode command lines, runs.

A device owner runs ``fedlora client`` (a supervised ``flower-supernode``), the server
operator ``fedlora certs``, ``fedlora server``, ``fedlora register`` and ``fedlora submit``.
Connections use TLS (a private CA made by `make_certificates`) and SuperNode
authentication (ECDSA P-384 keys made by `make_node_key`, registered by the operator).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError, FedloraError
from fedlora.launch import flower_env, flower_script, parse_overrides, toml_value, write_app, write_run_config

__all__ = [
    "DEFAULT_FLWR_HOME",
    "DEFAULT_NODE_PORT",
    "DEFAULT_PORT",
    "DEFAULT_STATE_DIR",
    "NODE_REFUSED",
    "Certificates",
    "add_deploy_commands",
    "make_certificates",
    "make_node_key",
    "node_config",
    "node_refused",
    "register_node",
    "submit",
    "superlink_command",
    "supernode_command",
    "supervise",
    "unregister_node",
    "write_flwr_home",
]

log = logging.getLogger(__name__)

DEFAULT_PORT = 9092
# Flower's default local port of a SuperNode (its ClientApp runtime API); one per node on a machine.
DEFAULT_NODE_PORT = 9094
DEFAULT_STATE_DIR = Path("~/.fedlora/state")
DEFAULT_FLWR_HOME = Path("~/.fedlora/flwr-home")
DEFAULT_DATABASE = Path("~/.fedlora/superlink.db")
# Flower's code (printed as "Exit Code: 305"; the process exits with status 1) of a SuperNode
# the SuperLink would not activate: its key is not registered, or the node was restarted
# before its last heartbeat expired.
NODE_REFUSED = 305

# Node-config keys that `fedlora client` sends (read by fedlora.client_app and fedlora.client.state).
NODE_DATA_DIR = "data-dir"
NODE_STATE_DIR = "state-dir"
NODE_PROFILE = "profile"
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"

_NODES_FILE = "fedlora-nodes.json"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ---------------------------------------------------------------------------
# Certificates and node keys
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """Paths of a private CA and of the SuperLink's certificate signed by it."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: Path) -> Certificates:
        """The file names `make_certificates` writes in ``directory``."""
        d = directory.expanduser().resolve()
        return cls(d / "ca.crt", d / "ca.key", d / "server.pem", d / "server.key")


def _write_private(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _refuse_existing(paths: Sequence[Path], field: str) -> None:
    for path in paths:
        if path.exists():
            raise FedloraError(f"{field}: {path} already exists; remove it or choose another path")


def make_certificates(
    directory: Path,
    hosts: Sequence[str] = ("127.0.0.1", "localhost"),
    *,
    days: int = 825,
    overwrite: bool = False,
) -> Certificates:
    """Write a self-signed CA and a SuperLink certificate signed by it, for ``hosts``.

    Writes ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` (private keys mode
    0600, ECDSA P-384). ``hosts`` are the names the SuperNodes use to reach the SuperLink:
    IP addresses become IP SANs, names DNS SANs. Give ``ca.crt`` to every device.

    Raises
    ------
    FedloraError
        If a file exists and ``overwrite`` is false (a new CA would orphan every device's
        copy of the old one), or ``hosts`` is empty.

    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ConfigError("host: at least one host name or IP address is needed")
    certs = Certificates.in_dir(directory)
    if not overwrite:
        _refuse_existing([certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key], "certs")
    certs.ca_cert.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora federation CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(certs.ca_key, pem_key(ca_key))
    _write_private(certs.server_key, pem_key(server_key))
    certs.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certs.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    return certs


def make_node_key(path: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a SuperNode's ECDSA P-384 key pair in OpenSSH format: ``path`` and ``path.pub``.

    The same files as ``ssh-keygen -t ecdsa -b 384 -N "" -f PATH``; the private key is
    mode 0600 and stays on the device, the ``.pub`` goes to the server operator.

    Raises
    ------
    FedloraError
        If either file exists and ``overwrite`` is false.

    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = path.expanduser().resolve()
    public = path.with_name(path.name + ".pub")
    if not overwrite:
        _refuse_existing([path, public], "node-key")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_bytes(line + f" fedlora-{path.name}\n".encode())
    return path, public


# ---------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------


def superlink_command(
    *,
    certs: Certificates | None,
    host: str = "0.0.0.0",
    port: int = DEFAULT_PORT,
    database: Path | None = None,
) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication (``certs=None``: insecure, no auth).

    The SuperLink serves the Fleet, Control and Runtime APIs on ``host:port``. With
    authentication, only registered node keys are let in; ``database`` keeps the
    registrations (and runs) across restarts.
    """
    command = [flower_script("flower-superlink"), "--host", host, "--port", str(port)]
    if certs is None:
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile",
            str(certs.ca_cert),
            "--ssl-certfile",
            str(certs.server_cert),
            "--ssl-keyfile",
            str(certs.server_key),
            "--enable-supernode-auth",
        ]
    if database is not None:
        command += ["--database", str(database.expanduser().resolve())]
    return [*command, "--disable-runtime-dependency-installation"]


def node_config(
    data_dir: Path,
    *,
    state_dir: Path = DEFAULT_STATE_DIR,
    profile: str = "",
    partition_id: int = 0,
    num_partitions: int = 1,
) -> str:
    """The ``--node-config`` string of a fedlora SuperNode (strings quoted, paths absolute).

    Raises
    ------
    ConfigError
        On a partition outside ``[0, num_partitions)`` or a path Flower cannot carry.

    """
    if num_partitions <= 0:
        raise ConfigError(f"num-partitions: must be a positive integer, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id: must be in [0, {num_partitions}), got {partition_id}")
    pairs: dict[str, str | int] = {
        NODE_DATA_DIR: str(data_dir.expanduser().resolve()),
        NODE_STATE_DIR: str(state_dir.expanduser().resolve()),
    }
    if profile:
        pairs[NODE_PROFILE] = profile
    pairs[NODE_PARTITION_ID] = partition_id
    pairs[NODE_NUM_PARTITIONS] = num_partitions
    for key, value in pairs.items():
        # Flower splits the string on quotes: a value cannot contain one.
        if isinstance(value, str) and ('"' in value or "'" in value):
            raise ConfigError(f"{key}: must not contain quotes, got {value!r}")
    return " ".join(f"{key}={toml_value(value)}" for key, value in pairs.items())


def supernode_command(
    superlink: str,
    *,
    root_cert: Path | None,
    key: Path | None,
    config: str,
    port: int = DEFAULT_NODE_PORT,
) -> list[str]:
    """``flower-supernode`` for ``superlink`` (``host:port``); ``root_cert=None``: insecure.

    ``key`` is the node's private key (SuperNode authentication); ``port`` is the node's
    own local port, which must differ between nodes on one machine.

    Raises
    ------
    ConfigError
        If a key is given without TLS (Flower refuses authentication in the clear).

    """
    command = [flower_script("flower-supernode"), "--superlink", superlink]
    if root_cert is None:
        if key is not None:
            raise ConfigError("key: node authentication needs TLS; drop --insecure or --key")
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(root_cert.expanduser().resolve())]
    if key is not None:
        command += ["--auth-supernode-private-key", str(key.expanduser().resolve())]
    return [*command, "--node-config", config, "--port", str(port)]


# ---------------------------------------------------------------------------
# Supervision
# ---------------------------------------------------------------------------


def node_refused(code: int, lines: Sequence[str]) -> str | None:
    """Why the SuperLink refused a SuperNode that exited with ``code`` after ``lines``, or None.

    Flower exits with status 1 on every error and prints its own code: 305 is a SuperNode
    whose activation the SuperLink answered with an error.
    """
    text = [_ANSI.sub("", line).strip() for line in lines]
    if code == 0 or not any(line.endswith(f"Exit Code: {NODE_REFUSED}") for line in text):
        return None
    answer = next((line for line in reversed(text) if line.startswith("[code:")), "no reason given")
    return (
        f"the SuperLink refused this node ({answer}): its key is not registered (give the "
        ".pub file to the server operator), or this node stopped less than about a minute ago "
        "and the SuperLink still counts it as online"
    )


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

    ``retry_when(exit_code, last_lines)`` says why an exit deserves a restart (None: it
    does not). SIGTERM and SIGINT are forwarded to the child and end the supervision. The
    child's output goes line by line to ``echo`` (default: this process's stderr);
    ``report`` says why a restart happens or stops. Call from the main thread.

    Returns
    -------
    int
        The child's exit status (128 + signal number if a signal ended it).

    """
    echo = echo or (lambda line: print(line, end="", file=sys.stderr, flush=True))  # noqa: T201
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


# ---------------------------------------------------------------------------
# The operator's Flower CLI: connections, registration, runs
# ---------------------------------------------------------------------------


def _connection_name(superlink: str) -> str:
    return "fedlora-" + re.sub(r"[^A-Za-z0-9_-]", "-", superlink)


def write_flwr_home(
    home: Path, superlink: str, *, root_cert: Path | None = None, insecure: bool = False
) -> str:
    """Add a ``[superlink.NAME]`` connection for ``superlink`` to ``home/config.toml``; return NAME.

    The `flwr` CLI (``flwr run``, ``flwr supernode register``) reads its connections from
    ``$FLWR_HOME/config.toml``; the new one becomes the default. Other fedlora connections
    in the file are kept.

    Raises
    ------
    ConfigError
        Without ``root_cert`` unless ``insecure``.

    """
    if root_cert is None and not insecure:
        raise ConfigError("root-cert: the CA certificate (ca.crt) is needed, or --insecure")
    home = home.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
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
    return " ".join(" ".join(kept).split())[-400:] or f"exit code {proc.returncode}"


def _public_key(path: Path) -> str:
    """``type base64`` of an OpenSSH public key file (the comment dropped)."""
    try:
        return " ".join(path.expanduser().read_text().split()[:2])
    except OSError as err:
        raise FedloraError(f"key: cannot read {path}: {err.strerror}") from None


def register_node(public_key: Path, superlink: str, *, home: Path) -> int:
    """Register a SuperNode's public key with ``superlink`` (``flwr supernode register``).

    ``home`` is a Flower home with a connection for ``superlink`` (`write_flwr_home`). The
    node id is recorded there, so that `unregister_node` can be given the key file.

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

    Returns the node id. A running node with that key is disconnected.

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


def submit(
    cfg: RunConfig,
    superlink: str,
    *,
    clients: int,
    out_dir: Path,
    root_cert: Path | None = None,
    insecure: bool = False,
    home: Path | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any] | None:
    """Start a run on a deployed SuperLink with ``flwr run``, wait for it, return its summary.

    The ServerApp writes the run directory at ``out_dir`` on the SuperLink's machine and
    waits for ``clients`` nodes (``min-clients``). Returns ``summary.json`` if that folder
    can be read from here, else None. ``echo`` gets the run's streamed log line by line.

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
    cfg = cfg.replace(out_dir=str(out_dir), min_clients=clients)
    summary_path = out_dir / "summary.json"
    summary_path.unlink(missing_ok=True)  # where the SuperLink's folder is visible from here
    with _home(home) as flwr_home, tempfile.TemporaryDirectory(prefix="fedlora-submit-") as tmp:
        conn = write_flwr_home(flwr_home, superlink, root_cert=root_cert, insecure=insecure)
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
        code = proc.wait()
        status = _run_status(run_id, conn, flwr_home) if run_id is not None else None
    if code != 0 or run_id is None:
        box = " ".join(line.strip("│ \n") for line in tail if line.startswith("│"))
        raise FedloraError(f"submit: the run did not start: {box or _ANSI.sub('', ''.join(tail))[-300:]}")
    if status is not None and not status.startswith("finished:completed"):
        raise FedloraError(f"submit: run {run_id} ended {status} (its log was streamed above)")
    return json.loads(summary_path.read_text()) if summary_path.exists() else None


def _run_status(run_id: int, conn: str, home: Path) -> str | None:
    """``status`` of a run as `flwr list` reports it, with its details if any."""
    proc = _flwr(["list", "--run-id", str(run_id), conn, "--format", "json"], home)
    runs = _json_tail(proc.stdout).get("runs") or []
    if not runs:
        return None
    details = str(runs[0].get("status-details") or "N/A")
    return str(runs[0].get("status")) + ("" if details == "N/A" else f": {details}")


# ---------------------------------------------------------------------------
# CLI: fedlora certs | node-key | server | register | client | submit
# ---------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"fedlora: {message}", file=sys.stderr, flush=True)  # noqa: T201


def _tls(args: argparse.Namespace) -> Path | None:
    """The CA certificate of a connection, or None with --insecure."""
    if args.insecure:
        return None
    if not args.root_cert:
        raise ConfigError("root-cert: the federation's CA certificate (ca.crt) is needed, or --insecure")
    root = Path(args.root_cert).expanduser().resolve()
    if not root.is_file():
        raise ConfigError(f"root-cert: {root} is not a file")
    return root


def _certs(args: argparse.Namespace) -> int:
    hosts = list(dict.fromkeys(["127.0.0.1", "localhost", *(args.host or [])]))
    certs = make_certificates(Path(args.dir), hosts)
    print(f"CA certificate (give it to every device): {certs.ca_cert}")  # noqa: T201
    print(f"SuperLink certificate for {', '.join(hosts)}: {certs.server_cert} (key {certs.server_key})")  # noqa: T201
    return 0


def _node_key(args: argparse.Namespace) -> int:
    private, public = make_node_key(Path(args.path))
    print(f"private key (stays on this device): {private}")  # noqa: T201
    print(f"public key (give it to the server operator): {public}")  # noqa: T201
    return 0


def _server(args: argparse.Namespace) -> int:
    if args.insecure:
        certs = None
    else:
        if not args.certs:
            raise ConfigError("certs: a folder written by `fedlora certs` is needed, or --insecure")
        certs = Certificates.in_dir(Path(args.certs))
        for path in (certs.ca_cert, certs.server_cert, certs.server_key):
            if not path.is_file():
                raise ConfigError(f"certs: {path} is missing; write the folder with `fedlora certs DIR`")
    database = Path(args.database).expanduser() if args.database else DEFAULT_DATABASE.expanduser()
    database.parent.mkdir(parents=True, exist_ok=True)
    command = superlink_command(certs=certs, host=args.host, port=args.port, database=database)
    _say(f"SuperLink on {args.host}:{args.port}, database {database.resolve()}")
    return supervise(command, env=flower_env())


def _register(args: argparse.Namespace) -> int:
    home = Path(args.flwr_home)
    write_flwr_home(home, args.superlink, root_cert=_tls(args), insecure=args.insecure)
    if args.unregister:
        target: Path | int = int(args.key) if args.key.isdigit() else Path(args.key)
        node_id = unregister_node(target, args.superlink, home=home)
        print(f"SuperNode {node_id} unregistered from {args.superlink}")  # noqa: T201
    else:
        node_id = register_node(Path(args.key), args.superlink, home=home)
        print(f"SuperNode {node_id} registered at {args.superlink} (key {args.key})")  # noqa: T201
    return 0


def _client(args: argparse.Namespace) -> int:
    if args.profile:
        from fedlora.client.profiles import PROFILES

        if args.profile not in PROFILES:
            raise ConfigError(f"profile: must be one of {', '.join(PROFILES)}, got {args.profile!r}")
    from fedlora.data.jsonl import client_folders

    data = Path(args.data).expanduser().resolve()
    folders = client_folders(data)  # the device's data is checked here, not in the first round
    if args.num_partitions > len(folders):
        raise ConfigError(
            f"num-partitions: {data} holds {len(folders)} client folder(s), got {args.num_partitions}"
        )
    if args.retry_for < 0:
        raise ConfigError(f"retry-for: must be >= 0 seconds, got {args.retry_for}")
    key = Path(args.key).expanduser().resolve() if args.key else None
    if key is not None and not key.is_file():
        raise ConfigError(f"key: {key} is not a file; make one with `fedlora node-key PATH`")
    state = Path(args.state_dir)
    config = node_config(
        data,
        state_dir=state,
        profile=args.profile or "",
        partition_id=args.partition_id,
        num_partitions=args.num_partitions,
    )
    command = supernode_command(
        args.superlink, root_cert=_tls(args), key=key, config=config, port=args.node_port
    )
    state.expanduser().mkdir(parents=True, exist_ok=True)
    _say(f"SuperNode for {args.superlink} with node config: {config}")
    return supervise(
        command, env=flower_env(), retry_when=node_refused, retry_for=args.retry_for, report=_say
    )


def _submit(args: argparse.Namespace) -> int:
    flat = parse_overrides(args.run_config or "")
    if args.strategy:
        flat["strategy"] = args.strategy
    if args.rounds is not None:
        flat["num-server-rounds"] = args.rounds
    cfg = RunConfig.from_flat(flat)
    out = Path(args.out or f"runs/deploy-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}").expanduser()
    out = out.resolve()
    summary = submit(
        cfg,
        args.superlink,
        clients=args.clients,
        out_dir=out,
        root_cert=_tls(args),
        insecure=args.insecure,
        home=Path(args.flwr_home) if args.flwr_home else None,
        echo=lambda line: print(line, end="", file=sys.stderr, flush=True),  # noqa: T201
    )
    if summary is None:
        print(f"run finished; results are in {out} on the SuperLink's machine")  # noqa: T201
        return 0
    final = summary["final"]
    print(f"run finished: {len(summary['rounds'])} rounds, results in {out}")  # noqa: T201
    for name in ("global_accuracy", "personalized_accuracy", "local_only_accuracy"):
        value = final.get(name)
        shown = "-" if value is None or value != value else f"{100 * value:.1f}%"
        print(f"  {name.replace('_', ' ')}: {shown}")  # noqa: T201
    return 0


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--superlink", required=True, help="the SuperLink's HOST:PORT")
    parser.add_argument("--root-cert", help="the federation's CA certificate (ca.crt from `fedlora certs`)")
    parser.add_argument("--insecure", action="store_true", help="no TLS (local testing only)")


def add_deploy_commands(sub: Any) -> None:
    """Add ``certs``, ``node-key``, ``server``, ``register``, ``client`` and ``submit`` to ``sub``.

    ``sub`` is the ``add_subparsers()`` object of the ``fedlora`` parser.
    """
    certs = sub.add_parser("certs", help="write a private CA and the SuperLink's TLS certificate")
    certs.add_argument("dir", help="folder for ca.crt, ca.key, server.pem, server.key")
    certs.add_argument(
        "--host",
        action="append",
        help="a name or IP address the devices use to reach the SuperLink (repeatable; "
        "127.0.0.1 and localhost are always included)",
    )
    certs.set_defaults(func=_certs)

    key = sub.add_parser(
        "node-key", help="write a device's key pair (PATH and PATH.pub, OpenSSH ECDSA P-384)"
    )
    key.add_argument("path", help="private key file; the public key goes to PATH.pub")
    key.set_defaults(func=_node_key)

    server = sub.add_parser("server", help="run the SuperLink (TLS, only registered devices admitted)")
    server.add_argument("--certs", help="folder written by `fedlora certs`")
    server.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    server.add_argument("--database", help=f"SuperLink state: nodes, keys, runs (default {DEFAULT_DATABASE})")
    server.add_argument(
        "--insecure", action="store_true", help="no TLS and no node authentication (testing only)"
    )
    server.set_defaults(func=_server)

    register = sub.add_parser("register", help="admit a device's public key to the SuperLink (or revoke it)")
    register.add_argument("key", help="the device's KEY.pub (with --unregister: KEY.pub or a node id)")
    _connection_args(register)
    register.add_argument("--unregister", action="store_true", help="revoke the node instead")
    register.add_argument(
        "--flwr-home", default=str(DEFAULT_FLWR_HOME), help=f"Flower CLI home (default {DEFAULT_FLWR_HOME})"
    )
    register.set_defaults(func=_register)

    client = sub.add_parser(
        "client", help="run this device's SuperNode (restarted while the SuperLink refuses it)"
    )
    _connection_args(client)
    client.add_argument("--key", help="this device's private key (from `fedlora node-key`)")
    client.add_argument(
        "--data",
        required=True,
        help="folder with train.jsonl and test.jsonl, or with one subfolder per client",
    )
    client.add_argument(
        "--state-dir",
        default=str(DEFAULT_STATE_DIR),
        help=f"where the personal adapter and privacy ledger are kept (default {DEFAULT_STATE_DIR})",
    )
    client.add_argument("--profile", help="device profile: phone, pi, laptop (caps on local work)")
    client.add_argument(
        "--partition-id", type=int, default=0, help="client subfolder of --data to use (default 0)"
    )
    client.add_argument(
        "--num-partitions", type=int, default=1, help="client subfolders shared by the nodes (default 1)"
    )
    client.add_argument(
        "--node-port",
        type=int,
        default=DEFAULT_NODE_PORT,
        help=f"this node's local port, distinct per node on one machine (default {DEFAULT_NODE_PORT})",
    )
    client.add_argument(
        "--retry-for",
        type=float,
        default=300.0,
        help="seconds to keep restarting while the SuperLink refuses the node (default 300)",
    )
    client.set_defaults(func=_client)

    run = sub.add_parser("submit", help="start a federated run on the deployed SuperLink and wait for it")
    _connection_args(run)
    run.add_argument(
        "--clients", type=int, default=2, help="nodes the server waits for (min-clients, default 2)"
    )
    run.add_argument("--rounds", type=int, help="federated rounds (run-config num-server-rounds)")
    run.add_argument(
        "--out", help="run directory on the SuperLink's machine (default runs/deploy-<timestamp>)"
    )
    run.add_argument("--strategy", help="aggregation strategy (default fedavg)")
    run.add_argument("--run-config", help='more run-config overrides, e.g. "labels=a,b,c local-steps=10"')
    run.add_argument("--flwr-home", help="Flower CLI home (default: a private temporary one)")
    run.set_defaults(func=_submit)
