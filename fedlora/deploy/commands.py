"""The SuperLink and ``flower-supernode`` command lines of a fedlora federation."""

from __future__ import annotations

import re
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from fedlora.client.policy import DevicePolicy
from fedlora.config import ModelConfig
from fedlora.core import keys
from fedlora.core.errors import ConfigError
from fedlora.deploy.certificates import Certificates
from fedlora.launch import flower_script, toml_value

__all__ = [
    "DEFAULT_DATABASE",
    "DEFAULT_NODE_PORT",
    "DEFAULT_PORT",
    "DEFAULT_RUNS_DIR",
    "DEFAULT_STATE_DIR",
    "NODE_DATA_DIR",
    "NODE_NUM_PARTITIONS",
    "NODE_PARTITION_ID",
    "NODE_PROFILE",
    "NODE_REFUSED",
    "NODE_STATE_DIR",
    "node_config",
    "node_refused",
    "private_folder",
    "runtime_command",
    "superexec_command",
    "superlink_command",
    "supernode_command",
]

DEFAULT_PORT = 9092
# Flower's default local port of a SuperNode (its ClientApp runtime API); one per node on a machine.
DEFAULT_NODE_PORT = 9094
DEFAULT_STATE_DIR = Path("~/.fedlora/state")
DEFAULT_DATABASE = Path("~/.fedlora/superlink.db")
DEFAULT_RUNS_DIR = Path("~/.fedlora/runs")  # `fedlora server`: where runs write (FEDLORA_RUNS_ROOT)
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

# Terminal colour codes in Flower's output (also stripped by fedlora.deploy.flower_cli).
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def superlink_command(
    *,
    certs: Certificates | None,
    operator_token: Path,
    host: str,
    port: int = DEFAULT_PORT,
    database: Path | None = None,
    superexec_secret: Path | None = None,
) -> list[str]:
    """Flower's SuperLink with TLS, SuperNode authentication and the operator's Control API.

    The SuperLink serves the Fleet, Control and Runtime APIs on ``host:port``. It is started
    through `fedlora.deploy.superlink`: the Control API answers only calls carrying the
    operator's token, the Runtime API only this machine. With node authentication, only
    registered node keys are let in. With ``superexec_secret``, the SuperLink starts no
    ServerApp itself (``--isolation process``): only a process proving it knows the secret
    (`superexec_command`'s) can take a ServerApp task from the Runtime API.

    Parameters
    ----------
    certs : Certificates or None
        The CA and the SuperLink's certificate; None for no TLS and no node authentication.
    operator_token : Path
        The operator token's file (`fedlora.deploy.operator_token`).
    host : str
        The address to listen on (``0.0.0.0``: every interface).
    port : int
        The port to listen on.
    database : Path or None
        Keeps the registrations (and runs) across restarts; None: Flower's default.
    superexec_secret : Path or None
        The secret file of the SuperLink's own SuperExec; None: Flower starts the ServerApps
        itself (``--isolation subprocess``) and the Runtime API has no secret.

    Returns
    -------
    list[str]
        The command line.

    """
    command = [sys.executable, "-m", "fedlora.deploy.superlink"]
    command += ["--operator-token-file", str(operator_token.expanduser().resolve())]
    command += ["--host", host, "--port", str(port)]
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
    if superexec_secret is not None:
        command += ["--isolation", "process"]
        command += ["--superexec-auth-secret-file", str(superexec_secret.expanduser().resolve())]
    return [*command, "--disable-runtime-dependency-installation"]


def superexec_command(
    *,
    host: str,
    port: int = DEFAULT_PORT,
    root_cert: Path | None,
    superexec_secret: Path,
    parent_pid: int | None = None,
) -> list[str]:
    """``flower-superexec`` for the ServerApps of the SuperLink on ``host:port``.

    It takes the SuperLink's ServerApp tasks from its Runtime API, proving with
    ``superexec_secret`` that it is the SuperLink's own, and starts a ``flwr-serverapp``
    process for each (as Flower's ``--isolation subprocess`` does, less the secret).

    Parameters
    ----------
    host : str
        The address the SuperLink listens on (``0.0.0.0`` or ``::``: reached on loopback).
    port : int
        Its port.
    root_cert : Path or None
        The federation's CA certificate; None if the SuperLink has no TLS.
    superexec_secret : Path
        The SuperLink's ``--superexec-auth-secret-file``.
    parent_pid : int or None
        A process whose end ends the SuperExec too (its supervisor).

    Returns
    -------
    list[str]
        The command line.

    """
    reach = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(host, host).strip("[]")
    address = f"[{reach}]:{port}" if ":" in reach else f"{reach}:{port}"
    command = [flower_script("flower-superexec"), "--runtime-api-address", address]
    if root_cert is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(root_cert.expanduser().resolve())]
    command += ["--superexec-auth-secret-file", str(superexec_secret.expanduser().resolve())]
    if parent_pid is not None:
        command += ["--parent-pid", str(parent_pid)]
    return command


def node_config(
    data_dir: Path,
    *,
    state_dir: Path = DEFAULT_STATE_DIR,
    profile: str = "",
    partition_id: int = 0,
    num_partitions: int = 1,
    device: str = "",
    policy: DevicePolicy | None = None,
) -> str:
    """The ``--node-config`` string of a fedlora SuperNode (strings quoted, paths absolute).

    Parameters
    ----------
    data_dir : Path
        The device's data: ``train.jsonl`` and ``test.jsonl``, or one subfolder per client.
    state_dir : Path
        Where the node keeps its personal adapter and privacy ledger.
    profile : str
        A device profile (`fedlora.client.profiles`); empty for none.
    partition_id : int
        The client subfolder of ``data_dir`` this node uses.
    num_partitions : int
        The client subfolders shared by the nodes.
    device : str
        Where this node computes (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``auto``); empty:
        the run's ``device``.
    policy : DevicePolicy or None
        The owner's limits on what a run may do on this node (`fedlora.client.policy`);
        None: none.

    Returns
    -------
    str
        ``key=value`` pairs separated by spaces.

    Raises
    ------
    ConfigError
        On a partition outside ``[0, num_partitions)`` or a path Flower cannot carry.

    """
    if num_partitions <= 0:
        raise ConfigError(f"num-partitions: must be a positive integer, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id: must be in [0, {num_partitions}), got {partition_id}")
    pairs: dict[str, str | int | float | bool] = {
        NODE_DATA_DIR: str(data_dir.expanduser().resolve()),
        NODE_STATE_DIR: str(state_dir.expanduser().resolve()),
    }
    if profile:
        pairs[NODE_PROFILE] = profile
    if device:
        ModelConfig(device=device)  # the same check as the run config's key
        pairs[keys.NODE_DEVICE] = device
    pairs[NODE_PARTITION_ID] = partition_id
    pairs[NODE_NUM_PARTITIONS] = num_partitions
    if policy is not None:
        pairs.update(policy.to_node_config())
    for key, value in pairs.items():
        # Flower splits the string on quotes: a value cannot contain one.
        if isinstance(value, str) and ('"' in value or "'" in value):
            raise ConfigError(f"{key}: must not contain quotes, got {value!r}")
    return " ".join(f"{key}={toml_value(value)}" for key, value in pairs.items())


def private_folder(path: Path) -> str | None:
    """Make ``path`` (parents too) a folder only its owner can open (0700); a note if it was not.

    Parameters
    ----------
    path : Path
        The folder, made if missing.

    Returns
    -------
    str or None
        What was changed, or could not be, for a log line; None if the folder was new or
        already 0700.

    """
    path = path.expanduser()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & 0o077:
        return None
    try:
        path.chmod(0o700)
    except OSError as err:
        reason = err.strerror or err
        return f"{path} is mode {mode:04o} and could not be made 0700 ({reason}): others may read it"
    return f"{path} was mode {mode:04o}; made it 0700 (its owner only)"


def supernode_command(
    superlink: str,
    *,
    root_cert: Path | None,
    key: Path | None,
    config: str,
    port: int = DEFAULT_NODE_PORT,
    superexec_secret: Path | None = None,
    own_runtime: bool = True,
) -> list[str]:
    """``flower-supernode`` for ``superlink`` (``host:port``); ``root_cert=None``: insecure.

    With ``own_runtime``, the SuperNode runs no ClientApp itself (``--isolation process``):
    fedlora's runtime (`runtime_command`) takes its tasks.

    Parameters
    ----------
    superlink : str
        The SuperLink's ``host:port``.
    root_cert : Path or None
        The federation's CA certificate; None for no TLS.
    key : Path or None
        The node's private key (SuperNode authentication); None for none.
    config : str
        The node config (`node_config`).
    port : int
        The node's own local port, which must differ between nodes on one machine.
    superexec_secret : Path or None
        A secret file that the runtime must prove it knows to take the node's tasks.
    own_runtime : bool
        Leave the ClientApps to fedlora's runtime; False: Flower starts the FAB's ClientApp
        in a subprocess for every task.

    Returns
    -------
    list[str]
        The command line.

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
    command += ["--node-config", config, "--port", str(port)]
    if own_runtime:
        command += ["--isolation", "process"]
        if superexec_secret is not None:
            command += ["--superexec-auth-secret-file", str(superexec_secret.expanduser().resolve())]
    return command


def runtime_command(
    port: int = DEFAULT_NODE_PORT,
    *,
    superexec_secret: Path | None = None,
    allow_fab_hashes: Sequence[str] = (),
) -> list[str]:
    """The command line of fedlora's ClientApp runtime (`fedlora.deploy.runtime`) on ``port``.

    Parameters
    ----------
    port : int
        The SuperNode's local port (`supernode_command`'s).
    superexec_secret : Path or None
        The SuperNode's secret file.
    allow_fab_hashes : Sequence[str]
        sha256 digests of FABs approved beside fedlora's own.

    Returns
    -------
    list[str]
        The command line.

    """
    command = [sys.executable, "-m", "fedlora.deploy.runtime", "--runtime-api-address", f"127.0.0.1:{port}"]
    if superexec_secret is not None:
        command += ["--superexec-auth-secret-file", str(superexec_secret.expanduser().resolve())]
    for digest in allow_fab_hashes:
        command += ["--allow-fab-hash", digest]
    return command


def node_refused(code: int, lines: Sequence[str]) -> str | None:
    """Why the SuperLink refused a SuperNode that exited with ``code`` after ``lines``, or None.

    Flower exits with status 1 on every error and prints its own code: 305 is a SuperNode
    whose activation the SuperLink answered with an error.

    Parameters
    ----------
    code : int
        The SuperNode's exit status.
    lines : Sequence[str]
        Its last lines of output.

    Returns
    -------
    str or None
        The reason, for a log line; None if the exit was not a refusal.

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
