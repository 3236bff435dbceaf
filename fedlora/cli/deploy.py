"""``fedlora certs``, ``node-key``, ``server``, ``register``, ``client`` and ``submit``: a deployment."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from fedlora.client.policy import DevicePolicy, allowed_model_entry
from fedlora.client.profiles import PROFILES
from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError
from fedlora.data.jsonl import client_folders
from fedlora.deploy import (
    DEFAULT_DATABASE,
    DEFAULT_FLWR_HOME,
    DEFAULT_NODE_PORT,
    DEFAULT_OPERATOR_TOKEN,
    DEFAULT_PORT,
    DEFAULT_RUNS_DIR,
    DEFAULT_STATE_DIR,
    OPERATOR_TOKEN,
    Certificates,
    companion,
    ensure_operator_token,
    make_certificates,
    make_node_key,
    node_config,
    node_refused,
    read_operator_token,
    register_node,
    runtime_command,
    submit,
    superexec_command,
    superlink_command,
    supernode_command,
    supervise,
    unregister_node,
    write_flwr_home,
)
from fedlora.deploy.commands import private_folder
from fedlora.launch import flower_env, parse_overrides
from fedlora.server.runs_root import DEPLOYED_ENV, RUNS_ROOT_ENV

__all__ = ["add_deploy_commands"]


def _say(message: str) -> None:
    print(f"fedlora: {message}", file=sys.stderr, flush=True)


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


def _token(args: argparse.Namespace) -> str | None:
    """The operator token of a register or submit: --token-file, else the one beside ca.crt."""
    if args.token_file:
        return read_operator_token(Path(args.token_file))
    beside = (
        Path(args.root_cert).expanduser().resolve().parent / OPERATOR_TOKEN
        if args.root_cert and not args.insecure
        else DEFAULT_OPERATOR_TOKEN.expanduser()
    )
    return read_operator_token(beside) if beside.is_file() else None


def _certs(args: argparse.Namespace) -> int:
    hosts = list(dict.fromkeys(["127.0.0.1", "localhost", *(args.host or [])]))
    certs = make_certificates(Path(args.dir), hosts)
    token, _ = ensure_operator_token(certs.ca_cert.parent / OPERATOR_TOKEN)
    print(f"CA certificate (give it to every device): {certs.ca_cert}")
    print(f"SuperLink certificate for {', '.join(hosts)}: {certs.server_cert} (key {certs.server_key})")
    print(f"operator token (keep it private; only it opens the Control API): {token}")
    return 0


def _node_key(args: argparse.Namespace) -> int:
    private, public = make_node_key(Path(args.path))
    print(f"private key (stays on this device): {private}")
    print(f"public key (give it to the server operator): {public}")
    return 0


def _private_secret(private: Path) -> Path:
    """A new random SuperExec secret in the private folder ``private`` (the file 0600)."""
    secret = private / "superexec.secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(os.urandom(32))
    return secret


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
    if args.token_file:
        token_file = Path(args.token_file)
    elif certs is not None:
        token_file = certs.ca_cert.parent / OPERATOR_TOKEN
    else:
        token_file = DEFAULT_OPERATOR_TOKEN
    token, new = ensure_operator_token(token_file)
    read_operator_token(token)  # a bad file stops here, not in the SuperLink
    database = Path(args.database).expanduser() if args.database else DEFAULT_DATABASE.expanduser()
    database.parent.mkdir(parents=True, exist_ok=True)
    runs = Path(args.runs_dir).expanduser().resolve()
    try:
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"runs-dir: cannot create {runs} ({err.strerror or err})") from None
    env = flower_env({RUNS_ROOT_ENV: str(runs), DEPLOYED_ENV: "1"})
    with tempfile.TemporaryDirectory(prefix="fedlora-server-") as private:  # 0700
        # A new secret at each start, known to the SuperLink and its own SuperExec only: the
        # Runtime API gives ServerApp tasks to no one else, whatever address they come from.
        secret = _private_secret(Path(private))
        command = superlink_command(
            certs=certs,
            operator_token=token,
            host=args.host,
            port=args.port,
            database=database,
            superexec_secret=secret,
        )
        superexec = superexec_command(
            host=args.host,
            port=args.port,
            root_cert=certs.ca_cert if certs is not None else None,
            superexec_secret=secret,
            parent_pid=os.getpid(),
        )
        _say(f"SuperLink on {args.host}:{args.port}, database {database.resolve()}, runs in {runs}")
        _say(f"Control API for the operator's token only: {token}" + (" (new)" if new else ""))
        _say("Runtime API for this start's own SuperExec only (a secret made now, in a private folder)")
        with companion(superexec, env=env, restart_after=2.0, name="the SuperExec", report=_say):
            return supervise(command, env=env)


def _register(args: argparse.Namespace) -> int:
    home = Path(args.flwr_home)
    write_flwr_home(home, args.superlink, root_cert=_tls(args), insecure=args.insecure, token=_token(args))
    if args.unregister:
        target: Path | int = int(args.key) if args.key.isdigit() else Path(args.key)
        node_id = unregister_node(target, args.superlink, home=home)
        print(f"SuperNode {node_id} unregistered from {args.superlink}")
    else:
        node_id = register_node(Path(args.key), args.superlink, home=home)
        print(f"SuperNode {node_id} registered at {args.superlink} (key {args.key})")
    return 0


def _policy(args: argparse.Namespace) -> DevicePolicy:
    """The device owner's policy from ``fedlora client``'s flags (`fedlora.client.policy`)."""
    policy = DevicePolicy(
        allowed_models=tuple(dict.fromkeys(allowed_model_entry(m) for m in args.allow_model)),
        min_noise_multiplier=args.min_noise_multiplier,
        max_epsilon=args.max_epsilon,
        max_lifetime_epsilon=args.max_lifetime_epsilon,
        max_delta=args.max_delta,
        require_dp=args.require_dp,
        max_steps=args.max_steps,
        max_threads=args.max_threads,
        max_length=args.max_length,
        max_eval_examples=args.max_eval_examples,
    )
    threads = PROFILES[args.profile].num_threads if args.profile else 0
    if policy.max_threads and threads > policy.max_threads:
        # The profile sets its threads whatever a run asks: every run would be refused.
        raise ConfigError(
            f"max-threads: profile {args.profile!r} runs {threads} torch threads, over --max-threads "
            f"{policy.max_threads}; raise one or drop the profile"
        )
    return policy


def _client(args: argparse.Namespace) -> int:
    if args.profile and args.profile not in PROFILES:
        raise ConfigError(f"profile: must be one of {', '.join(PROFILES)}, got {args.profile!r}")
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
        device=args.device or "",
        policy=_policy(args),
    )
    root_cert = _tls(args)
    # It holds the personal adapter and the privacy ledger: its owner's only.
    note = private_folder(state)
    if note is not None:
        _say(f"state-dir: {note}")
    with tempfile.TemporaryDirectory(prefix="fedlora-node-") as private:  # 0700
        secret = _private_secret(Path(private))
        command = supernode_command(
            args.superlink,
            root_cert=root_cert,
            key=key,
            config=config,
            port=args.node_port,
            superexec_secret=secret,
        )
        runtime = runtime_command(
            args.node_port, superexec_secret=secret, allow_fab_hashes=args.allow_fab_hash
        )
        _say(f"SuperNode for {args.superlink} with node config: {config}")
        _say("ClientApps run by fedlora's runtime: fedlora's own app, for approved FABs only")
        # The SuperNode fails every task while its runtime is gone: a dead one is restarted.
        with companion(
            runtime, env=flower_env(), restart_after=2.0, name="the ClientApp runtime", report=_say
        ):
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
    out = args.out or f"deploy-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    submitted = submit(
        cfg,
        args.superlink,
        clients=args.clients,
        out=out,
        root_cert=_tls(args),
        insecure=args.insecure,
        token=_token(args),
        home=Path(args.flwr_home) if args.flwr_home else None,
        echo=lambda line: print(line, end="", file=sys.stderr, flush=True),
    )
    where = submitted.run_dir or f"{out} in the server's runs folder"
    summary = submitted.summary
    if summary is None:
        print(f"run finished; results are in {where} on the SuperLink's machine")
        return 0
    final = summary["final"]
    print(f"run finished: {len(summary['rounds'])} rounds, results in {where}")
    for name in ("global_accuracy", "personalized_accuracy", "local_only_accuracy"):
        value = final.get(name)
        shown = "-" if value is None or value != value else f"{100 * value:.1f}%"
        print(f"  {name.replace('_', ' ')}: {shown}")
    return 0


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--superlink", required=True, help="the SuperLink's HOST:PORT")
    parser.add_argument("--root-cert", help="the federation's CA certificate (ca.crt from `fedlora certs`)")
    parser.add_argument("--insecure", action="store_true", help="no TLS (local testing only)")


def _token_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--token-file",
        help=f"the operator token (default: {OPERATOR_TOKEN} beside --root-cert, if there; "
        f"{DEFAULT_OPERATOR_TOKEN} with --insecure)",
    )


def _policy_args(client: argparse.ArgumentParser) -> None:
    """``fedlora client``'s policy flags: what any run may make this device load and do."""
    default = DevicePolicy()
    policy = client.add_argument_group(
        "device policy",
        "this device's own limits, whatever a run config says: a run asking for less privacy or "
        "more work is refused with an error reply naming the limit, and nothing of it runs",
    )
    policy.add_argument(
        "--allow-model",
        action="append",
        default=[],
        metavar="PATH_OR_HUB_ID",
        help="a model folder or hub id runs may name, beside the bundled models (repeatable)",
    )
    policy.add_argument(
        "--require-dp",
        action="store_true",
        help="refuse runs without DP-SGD (implied by the three flags below)",
    )
    policy.add_argument(
        "--min-noise-multiplier",
        type=float,
        default=default.min_noise_multiplier,
        metavar="X",
        help="the lowest DP-SGD noise multiplier a run may use: its dp-noise-multiplier, or the one "
        "calibrated from dp-target-epsilon",
    )
    policy.add_argument(
        "--max-epsilon",
        type=float,
        default=default.max_epsilon,
        metavar="E",
        help="the largest epsilon of one run: its dp-epsilon-budget (which a run must then set) and "
        "dp-target-epsilon",
    )
    policy.add_argument(
        "--max-lifetime-epsilon",
        type=float,
        default=default.max_lifetime_epsilon,
        metavar="E",
        help="the largest epsilon over every run in --state-dir: the sum of each earlier run's epsilon "
        "plus this run's dp-epsilon-budget (a conservative sum)",
    )
    policy.add_argument(
        "--max-delta",
        type=float,
        default=default.max_delta,
        metavar="D",
        help=f"the largest dp-delta while an epsilon cap is set (default {default.max_delta:g})",
    )
    for flag, what in (
        ("--max-steps", "local-steps and personal-steps per round"),
        ("--max-threads", "num-threads (0, torch's default, counts as every core)"),
        ("--max-length", "max-length, tokens per example"),
        ("--max-eval-examples", "eval-examples (0, every example, counts as more) and audit-examples"),
    ):
        policy.add_argument(
            flag, type=int, default=0, metavar="N", help=f"the most {what} (default 0: no cap)"
        )


def add_deploy_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``certs``, ``node-key``, ``server``, ``register``, ``client`` and ``submit`` to ``sub``.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The ``add_subparsers()`` object of the ``fedlora`` parser.

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
    server.add_argument(
        "--host",
        required=True,
        help="address to listen on: 0.0.0.0 for every interface (devices on the network), "
        "127.0.0.1 for this machine only (an SSH tunnel or a proxy in front); no default, "
        "since it decides who can reach the SuperLink",
    )
    server.add_argument(
        "--token-file",
        help=f"the operator token (made if missing; default CERTS/{OPERATOR_TOKEN}, "
        f"or {DEFAULT_OPERATOR_TOKEN} with --insecure)",
    )
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    server.add_argument("--database", help=f"SuperLink state: nodes, keys, runs (default {DEFAULT_DATABASE})")
    server.add_argument(
        "--runs-dir",
        default=str(DEFAULT_RUNS_DIR),
        help="the only folder runs write into; a run's --out names a folder inside it "
        f"(default {DEFAULT_RUNS_DIR})",
    )
    server.add_argument(
        "--insecure", action="store_true", help="no TLS and no node authentication (testing only)"
    )
    server.set_defaults(func=_server)

    register = sub.add_parser("register", help="admit a device's public key to the SuperLink (or revoke it)")
    register.add_argument("key", help="the device's KEY.pub (with --unregister: KEY.pub or a node id)")
    _connection_args(register)
    register.add_argument("--unregister", action="store_true", help="revoke the node instead")
    _token_arg(register)
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
        "--device", help="where this device computes: cpu, cuda, cuda:N, mps or auto (default: the run's)"
    )
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
    client.add_argument(
        "--allow-fab-hash",
        action="append",
        default=[],
        metavar="SHA256",
        help="also run runs of this FAB (an operator's own app; repeatable); fedlora's own is "
        "always approved, and either way this device's installed fedlora ClientApp is what runs",
    )
    _policy_args(client)
    client.set_defaults(func=_client)

    run = sub.add_parser("submit", help="start a federated run on the deployed SuperLink and wait for it")
    _connection_args(run)
    run.add_argument(
        "--clients", type=int, default=2, help="nodes the server waits for (min-clients, default 2)"
    )
    run.add_argument("--rounds", type=int, help="federated rounds (run-config num-server-rounds)")
    run.add_argument(
        "--out",
        help="run directory on the SuperLink's machine: a folder name inside the server's --runs-dir "
        "(or an absolute path inside it; default deploy-<timestamp>)",
    )
    run.add_argument("--strategy", help="aggregation strategy (default fedavg)")
    run.add_argument("--run-config", help='more run-config overrides, e.g. "labels=a,b,c local-steps=10"')
    run.add_argument("--flwr-home", help="Flower CLI home (default: a private temporary one)")
    _token_arg(run)
    run.set_defaults(func=_submit)
