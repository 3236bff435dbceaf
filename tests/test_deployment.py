"""A real deployment on loopback: TLS, SuperNode authentication, `fedlora client` and `fedlora submit`."""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import write_client
from helpers import TINY_FEDERATION

from fedlora.client.state import read_state
from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError, FedloraError
from fedlora.core.keys import S_PERSONAL_ROUNDS
from fedlora.deploy import (
    make_certificates,
    make_node_key,
    node_config,
    node_refused,
    supernode_command,
    supervise,
    write_flwr_home,
)
from fedlora.launch import flower_env, flower_script, free_port, write_app
from fedlora.models import load_base

# Set by `simulations/bench_runtime.py`: the approved-apps test also times Flower's subprocess isolation.
BENCH_RUNTIME = "FEDLORA_BENCH_RUNTIME"
TOPICS = {"sport": "goal match team", "music": "song band guitar", "cooking": "recipe oven salt"}


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


def test_certificates_are_a_ca_and_a_server_certificate_for_the_hosts(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    certs = make_certificates(tmp_path, ("127.0.0.1", "localhost", "fl.example.org"))

    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.issuer == ca.subject
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert isinstance(server.public_key(), ec.EllipticCurvePublicKey)
    assert stat.S_IMODE(certs.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(certs.server_key.stat().st_mode) == 0o600
    # A second CA would orphan every device's ca.crt: refused unless asked for.
    with pytest.raises(FedloraError, match="ca.crt already exists"):
        make_certificates(tmp_path)


def test_node_key_is_an_openssh_ecdsa_p384_pair(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private, public = make_node_key(tmp_path / "keys" / "node")

    assert public == tmp_path / "keys" / "node.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    line = public.read_text()
    assert line.startswith("ecdsa-sha2-nistp384 ")
    assert (
        serialization.load_ssh_public_key(line.encode()).public_numbers() == key.public_key().public_numbers()
    )


def test_node_config_quotes_strings_and_checks_the_partition(tmp_path):
    config = node_config(tmp_path / "data", state_dir=tmp_path / "state", profile="pi")
    assert config == (
        f'data-dir="{tmp_path / "data"}" state-dir="{tmp_path / "state"}" profile="pi" '
        "partition-id=0 num-partitions=1"
    )
    # Flower parses it back into the values fedlora's ClientApp reads.
    from flwr.common.config import parse_config_args

    assert parse_config_args([config]) == {
        "data-dir": str(tmp_path / "data"),
        "state-dir": str(tmp_path / "state"),
        "profile": "pi",
        "partition-id": 0,
        "num-partitions": 1,
    }
    with pytest.raises(ConfigError, match=r"partition-id: must be in \[0, 2\), got 2"):
        node_config(tmp_path, partition_id=2, num_partitions=2)
    with pytest.raises(ConfigError, match="data-dir: must not contain quotes"):
        node_config(tmp_path / 'a"b')


def test_supernode_command_refuses_a_key_without_tls(tmp_path):
    command = supernode_command(
        "h:1", root_cert=tmp_path / "ca.crt", key=tmp_path / "k", config="x=1", port=7
    )
    assert command[1:] == [
        "--superlink",
        "h:1",
        "--root-certificates",
        str(tmp_path / "ca.crt"),
        "--auth-supernode-private-key",
        str(tmp_path / "k"),
        "--node-config",
        "x=1",
        "--port",
        "7",
        "--isolation",
        "process",
    ]
    with pytest.raises(ConfigError, match="key: node authentication needs TLS"):
        supernode_command("h:1", root_cert=None, key=tmp_path / "k", config="")


def test_flwr_home_connection_is_read_by_flwr(tmp_path):
    from flwr.cli.flower_config import parse_superlink_connection

    ca = tmp_path / "ca.crt"
    name = write_flwr_home(tmp_path / "home", "10.0.0.1:9092", root_cert=ca)
    other = write_flwr_home(tmp_path / "home", "localhost:9093", insecure=True)

    config = tomllib.loads((tmp_path / "home" / "config.toml").read_text())["superlink"]
    assert config["default"] == other
    first = parse_superlink_connection(config[name], name)
    assert (first.address, first.root_certificates, first.insecure) == ("10.0.0.1:9092", str(ca), False)
    second = parse_superlink_connection(config[other], other)
    assert (second.address, second.insecure) == ("localhost:9093", True)


def test_node_refused_reads_flowers_exit_message():
    lines = ["\x1b[91mERROR \x1b[0m:     Exit Code: 305\n", "[code: 2004] Failed to activate SuperNode.\n"]
    assert "([code: 2004] Failed to activate SuperNode.)" in (node_refused(1, lines) or "")
    assert node_refused(1, ["Exit Code: 302"]) is None
    assert node_refused(0, lines) is None


def test_supervise_retries_a_refusal_until_the_deadline_then_returns_its_code(tmp_path):
    attempts = tmp_path / "attempts"
    script = f"open({str(attempts)!r}, 'a').write('x'); print('Exit Code: 305'); raise SystemExit(1)"
    reports: list[str] = []

    code = supervise(
        [sys.executable, "-c", script],
        env=os.environ,
        retry_when=node_refused,
        retry_for=2.0,
        retry_every=0.5,
        echo=lambda line: None,
        report=reports.append,
    )

    assert code == 1
    assert 2 <= len(attempts.read_text()) <= 6
    assert all("the SuperLink refused this node" in r for r in reports)
    assert "retrying in" in reports[0] and reports[-1].endswith("giving up after 2 s")


def test_supervise_forwards_sigterm_and_returns_the_childs_code(tmp_path):
    ready = tmp_path / "ready"
    child = (
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )
    parent = (
        "import os, sys\n"
        "from fedlora.deploy import supervise\n"
        f"sys.exit(supervise([sys.executable, '-c', {child!r}], env=os.environ))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        _wait_for(ready.exists, time.monotonic() + 30, "the supervised child to start")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 7
    finally:
        proc.kill()


# ---------------------------------------------------------------------------
# A real federation on loopback
# ---------------------------------------------------------------------------


def _start_server(processes, tmp_path: Path, port: int, deadline: float, *extra: str):
    """`fedlora server` with the certificates in ``tmp_path/certs``, runs in ``tmp_path``; once it listens."""
    server, server_log = processes.start(
        "server",
        *("server", "--certs", str(tmp_path / "certs"), "--host", "127.0.0.1", "--port", str(port)),
        *("--runs-dir", str(tmp_path), *extra),
    )
    _wait_for(_line_or_exit(server, server_log, "Application startup complete"), deadline, "the SuperLink")
    return server, server_log


def _wait_for(condition: Callable[[], bool], deadline: float, what: str) -> None:
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class _Processes:
    """Processes started for one test, each in its own session, all stopped at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # Flower starts some helpers in sessions of their own: they carry this mark in their environment.
        self.mark = f"FEDLORA_TEST_DEPLOYMENT={uuid.uuid4().hex}"
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self, name: str, *args: str, home: Path | None = None, program: tuple[str, ...] | None = None
    ) -> tuple[subprocess.Popen[bytes], Path]:
        key, value = self.mark.split("=")
        # Flower starts its helpers (flower-superexec) from PATH: this environment's first.
        env = {**flower_env(), key: value, "FLWR_HOME": str(self.root / f"flwr-home-{name}")}
        # Each process and whatever it starts (SuperNode, SuperExec, ClientApps) carries its name.
        env["FEDLORA_TEST_PROCESS"] = name
        if home is not None:
            env["HOME"] = str(home)
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*(program or (sys.executable, "-m", "fedlora.cli")), *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc, log

    def run(self, name: str, *args: str, timeout: float, home: Path | None = None) -> tuple[int, str]:
        """Run a ``fedlora`` command to its end; its exit code and output."""
        proc, log = self.start(name, *args, home=home)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"fedlora {args[0]} did not finish: {log.read_text()[-3000:]}") from None
        return code, log.read_text()

    def marked(self) -> list[int]:
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if self.mark.encode() in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except (OSError, ValueError):
                continue
        return found

    def crash(self, name: str) -> int:
        """SIGKILL process ``name`` and everything it started: a device losing power."""
        mark = f"FEDLORA_TEST_PROCESS={name}".encode()
        killed = 0
        for pid in self.marked():
            try:
                if mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
            except OSError:
                continue
        return killed

    def stop(self) -> None:
        for proc in self.procs:
            _signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        _wait_for(lambda: not self.marked(), time.monotonic() + 10, "Flower helpers to exit")


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[_Processes]:
    procs = _Processes(tmp_path)
    try:
        yield procs
    finally:
        try:
            procs.stop()
        finally:
            for pid in procs.marked():  # whatever outlived its parent
                _signal_group(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)


def _line_or_exit(proc: subprocess.Popen[bytes], log: Path, text: str) -> Callable[[], bool]:
    return lambda: text in log.read_text() or proc.poll() is not None


def _tiny_run_config() -> str:
    flat = {k.replace("_", "-"): v for k, v in TINY_FEDERATION.items() if k != "clients"}
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in flat.items())


def _runs(pid: int, name: str, module: str) -> bool:
    """Whether process ``pid`` was started for test process ``name`` and runs ``python -m module``."""
    try:
        env, argv = (Path(f"/proc/{pid}/{part}").read_bytes().split(b"\0") for part in ("environ", "cmdline"))
    except OSError:  # it has exited meanwhile
        return False
    return f"FEDLORA_TEST_PROCESS={name}".encode() in env and module.encode() in argv


@pytest.mark.slow
@pytest.mark.federation
def test_fedlora_clients_with_registered_keys_complete_a_tls_federation(tmp_path, processes):
    # Prepare: a CA, four device keys (three registered), three devices' own data folders.
    certs = make_certificates(tmp_path / "certs")
    keys = [make_node_key(tmp_path / "keys" / f"node{i}")[0] for i in range(4)]
    for i, (topic, words) in enumerate(TOPICS.items()):
        other = list(TOPICS)[(i + 1) % 3]
        train = [{"text": f"{words} {n}", "label": topic} for n in range(12)]
        train += [{"text": f"{TOPICS[other]} {n}", "label": other} for n in range(4)]
        write_client(
            tmp_path / f"device{i}", train, [{"text": f"{words} x{n}", "label": topic} for n in range(4)]
        )
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    tls = ["--superlink", superlink, "--root-cert", str(certs.ca_cert)]
    deadline = time.monotonic() + 240

    # Execute: the SuperLink (TLS, node authentication, a database), then registrations.
    server, server_log = _start_server(
        processes, tmp_path, port, deadline, "--database", str(tmp_path / "superlink.db")
    )
    assert server.poll() is None, server_log.read_text()[-2000:]
    for i, key in enumerate(keys[:3]):
        # `fedlora register` keeps its Flower connection in ~/.fedlora/flwr-home.
        code, output = processes.run(
            f"register{i}", "register", f"{key}.pub", *tls, timeout=60, home=tmp_path
        )
        assert code == 0 and "registered at" in output, output

    def client(i: int, *extra: str) -> tuple[subprocess.Popen[bytes], Path]:
        return processes.start(
            f"node{i}",
            *("client", *tls, "--key", str(keys[i]), "--data", str(tmp_path / f"device{i % 3}")),
            *("--state-dir", str(tmp_path / f"state{i}"), "--node-port", str(free_port()), *extra),
        )

    # The fourth key was never registered: the SuperLink refuses it.
    intruder, intruder_log = client(3, "--retry-for", "0")
    nodes = [client(i) for i in range(3)]
    for i, (proc, log) in enumerate(nodes):
        _wait_for(_line_or_exit(proc, log, "SuperNode ID:"), deadline, f"node {i} to join")
        assert proc.poll() is None, log.read_text()[-2000:]
    assert intruder.wait(timeout=max(1, deadline - time.monotonic())) != 0
    refusal = [line for line in intruder_log.read_text().splitlines() if line.startswith("fedlora: the")]
    assert refusal == [
        "fedlora: the SuperLink refused this node ([code: 2004] Failed to activate SuperNode.): its key "
        "is not registered (give the .pub file to the server operator), or this node stopped less than "
        "about a minute ago and the SuperLink still counts it as online; giving up"
    ]
    assert "No SuperNode found with the given public key" in server_log.read_text()

    # A 4-round run; node 2 loses power at the start of round 2 and comes back at once.
    out = tmp_path / "run"
    run_config = f"labels=cooking,music,sport round-timeout=30 min-reply-fraction=0.5 {_tiny_run_config()}"
    submit, submit_log = processes.start(
        "submit",
        *("submit", *tls, "--clients", "3", "--rounds", "4", "--out", str(out)),
        *("--flwr-home", str(tmp_path / "flwr-home-submit"), "--run-config", run_config),
    )

    def round_done(n: int) -> Callable[[], bool]:
        def done() -> bool:
            path = out / "metrics.jsonl"
            events = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
            return submit.poll() is not None or any(e == {**e, "event": "round", "round": n} for e in events)

        return done

    _wait_for(round_done(1), deadline, "round 1")
    assert submit.poll() is None, submit_log.read_text()[-3000:]
    state = next((tmp_path / "state2").glob("*/*.state"))
    before = read_state(state).config_records[S_PERSONAL_ROUNDS]["rounds"]
    assert before == 1
    assert processes.crash("node2") >= 2  # `fedlora client`, its SuperNode and their children
    # Node 0's ClientApp runtime alone dies (its SuperNode lives): `fedlora client` restarts it.
    (runtime,) = [pid for pid in processes.marked() if _runs(pid, "node0", "fedlora.deploy.runtime")]
    os.kill(runtime, signal.SIGKILL)
    rejoined, rejoined_log = client(2, "--retry-for", "200")
    assert submit.wait(timeout=max(1, deadline + 240 - time.monotonic())) == 0, submit_log.read_text()[-3000:]
    submitted = submit_log.read_text()

    # Assert: every round completed; the one node 2 missed with the others; it rejoined with its state.
    assert f"run finished: 4 rounds, results in {out}" in submitted
    summary = json.loads((out / "summary.json").read_text())
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert rounds[0]["clients_trained"] == 3
    assert rounds[1]["clients_trained"] == 2 and rounds[1]["clients_failed"] == 1
    # Node 0 trained in round 2 (with node 1) and in round 4 (all three) with its restarted runtime.
    node0 = nodes[0][1].read_text()
    restart = "fedlora: the ClientApp runtime was killed by signal 9; restarted it after 2 s"
    assert restart in node0, node0[-3000:]
    assert node0.split(restart)[1].count("fedlora.client_app:app answered train") >= 2, node0[-3000:]
    assert rounds[-1]["clients_trained"] == 3, "node 2 did not take part again"
    evaluations = rejoined_log.read_text().count("Sending: evaluate message")
    after = read_state(state).config_records[S_PERSONAL_ROUNDS]["rounds"]
    # Its personal adapter went on from round 1's: trained once before the crash, then in every
    # round it evaluated after rejoining (a node that had lost its state would count from 0).
    assert evaluations >= 1 and after == before + evaluations
    per_client = summary["per_client"]["final_round"]
    assert len(per_client) == 3 and all(k.startswith("node-") for k in per_client)
    assert sorted(c["personal_rounds"] for c in per_client.values())[0] == after
    for name in ("global_accuracy", "personalized_accuracy"):
        assert math.isfinite(summary["final"][name]) and 0.0 <= summary["final"][name] <= 1.0
    assert (out / "global_adapter" / "adapter_model.safetensors").exists()
    for i in range(3):
        assert list((tmp_path / f"state{i}").glob("*/*.state")), f"node {i} kept no state on disk"
    assert all(proc.poll() is None for proc, _ in nodes[:2]) and rejoined.poll() is None
    assert server.poll() is None


def _flwr(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The unmodified ``flwr`` CLI with its own Flower home."""
    return subprocess.run(
        [flower_script("flwr"), *args],
        env=flower_env({"FLWR_HOME": str(home), "COLUMNS": "200"}),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _rogue_app(directory: Path, marker: Path) -> Path:
    """A Flower app of someone's own: importing it on either side leaves ``marker``."""
    write_app(directory, RunConfig())
    pyproject = (directory / "pyproject.toml").read_text()
    pyproject = pyproject.replace('name = "fedlora-run"', 'name = "rogue"')
    pyproject = pyproject.replace("fedlora.server_app:app", "rogue:app").replace(
        "fedlora.client_app:app", "rogue:app"
    )
    (directory / "pyproject.toml").write_text(pyproject)
    (directory / "rogue.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\napp = None\n"
    )
    return directory


def _poll_runtime_api(superlink: str, ca_cert: Path, answers: list[object], stop: threading.Event) -> None:
    """Ask the SuperLink's Runtime API for a task every 0.2 s, as a peer without its secret.

    The calls are Flower's own (its Runtime client, as its SuperExec makes them, less the
    secret); ``answers`` gets each HTTP status, or ``"task"`` for a task handed out. After
    the first, one ``pull-task-input`` with a guessed task token is tried too.
    """
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullTaskInputRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    def client(*interceptors: object) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(  # no retry invoker: Flower's ends the process
            server_address=superlink,
            insecure=False,
            root_certificates=ca_cert.read_bytes(),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"), *interceptors],
        )

    runtime = client()
    request = AcquireTaskRequest(supported_task_types=list(TaskType))
    while not stop.is_set():
        try:
            res = runtime.AcquireTask(request)
            answers.append("task" if res.HasField("task") else 200)
        except httpx.HTTPStatusError as err:
            answers.append(err.response.status_code)
        except httpx.TransportError:
            pass
        if len(answers) == 1:  # and a task's inputs, with a token it never got
            try:
                client(RuntimeTokenHttpInterceptor("guessed-token")).PullTaskInput(PullTaskInputRequest())
                answers.append(200)
            except httpx.HTTPStatusError as err:
                answers.append(err.response.status_code)
        stop.wait(0.2)
    runtime.close()


_ROGUE_SERVER = """
import json, time
from flwr.app import Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()


@app.main()
def main(grid, context):
    nodes = []
    while not nodes:
        nodes = list(grid.get_node_ids())
        time.sleep(0.5)
    messages = [Message(RecordDict(), message_type="train", dst_node_id=n) for n in nodes]
    replies = [
        {"code": r.error.code, "reason": r.error.reason} if r.has_error() else {"code": None}
        for r in grid.send_and_receive(messages, timeout=60)
    ]
    with open(context.run_config["out"], "w") as fh:
        json.dump(replies, fh)
"""


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _round_seconds(out: Path) -> list[float]:
    """Wall seconds of each round after the first, from the run's round events."""
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [e["t"] for e in events if e.get("event") == "round"]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


@pytest.mark.slow
@pytest.mark.federation
def test_only_the_operator_controls_devices_that_run_only_approved_apps(tmp_path, processes):
    # Prepare: a CA, two registered device keys, a third key; a party holding only ca.crt;
    # one device's data; a rogue app whose ClientApp would leave a marker, and whose
    # ServerApp records the replies.
    certs = make_certificates(tmp_path / "certs")
    keys = [make_node_key(tmp_path / "keys" / f"node{i}")[0] for i in range(2)]
    other_key = make_node_key(tmp_path / "keys" / "other")[0]
    write_client(
        tmp_path / "data",
        [{"text": f"{TOPICS[t]} {n}", "label": t} for t in ("sport", "music") for n in range(8)],
        [{"text": f"{TOPICS[t]} x{n}", "label": t} for t in ("sport", "music") for n in range(2)],
    )
    outsider = tmp_path / "outsider"
    outsider.mkdir()
    (outsider / "ca.crt").write_bytes(certs.ca_cert.read_bytes())
    marker = tmp_path / "ROGUE_CODE_RAN"
    rogue = write_app(tmp_path / "rogue", RunConfig())
    text = (rogue / "pyproject.toml").read_text().replace('name = "fedlora-run"', 'name = "rogue"')
    text = text.replace("fedlora.server_app:app", "rogue_server:app").replace(
        "fedlora.client_app:app", "rogue_client:app"
    )
    (rogue / "pyproject.toml").write_text(text + f'out = "{tmp_path / "replies.json"}"\n')
    (rogue / "rogue_server.py").write_text(_ROGUE_SERVER)
    (rogue / "rogue_client.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\napp = None\n"
    )
    port = free_port()
    superlink = f"127.0.0.1:{port}"
    operator = ["--superlink", superlink, "--root-cert", str(certs.ca_cert)]
    deadline = time.monotonic() + 400
    server, server_log = _start_server(
        processes, tmp_path, port, deadline, "--database", str(tmp_path / "superlink.db")
    )
    assert server.poll() is None, server_log.read_text()[-2000:]
    token = tmp_path / "certs" / "operator.token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600  # written by `fedlora server`
    node_ids = []
    for i, key in enumerate(keys):
        code, output = processes.run(
            f"register{i}", "register", f"{key}.pub", *operator, timeout=60, home=tmp_path
        )
        assert code == 0 and "registered at" in output, output
        node_ids.append(output.split("SuperNode ")[1].split()[0])

    # Every Control call of the outsider (ca.crt, no operator token) is refused.
    code, output = processes.run(
        "outsider-register",
        *("register", f"{other_key}.pub", "--superlink", superlink, "--root-cert", str(outsider / "ca.crt")),
        timeout=60,
        home=outsider,
    )
    assert code != 0 and "not the operator's token" in output, output
    outsider_home = outsider / "flwr-home"
    outsider_conn = write_flwr_home(outsider_home, superlink, root_cert=outsider / "ca.crt")
    unregister = _flwr(outsider_home, "supernode", "unregister", node_ids[0], outsider_conn)
    outsider_marker = tmp_path / "OUTSIDER_CODE_RAN"
    run = _flwr(outsider_home, "run", str(_rogue_app(outsider / "app", outsider_marker)), outsider_conn)
    for proc in (unregister, run):
        assert proc.returncode != 0 and "Authentication failed" in proc.stdout + proc.stderr, proc.stdout

    state = tmp_path / "state"
    # The device's own policy: DP-SGD with a noise multiplier of at least 0.8, at most 5 steps.
    node, node_log = processes.start(
        "node",
        *("client", *operator, "--key", str(keys[0]), "--data", str(tmp_path / "data")),
        *("--state-dir", str(state), "--node-port", str(free_port())),
        *("--min-noise-multiplier", "0.8", "--max-steps", "5"),
    )
    _wait_for(_line_or_exit(node, node_log, "SuperNode ID:"), deadline, "the node to join")
    run_config = f"labels=music,sport {_tiny_run_config()} dp-noise-multiplier=1.0"

    def start(name: str, rounds: int, out: str | None = None, config: str = run_config):
        return processes.start(
            name,
            *("submit", *operator, "--clients", "1", "--rounds", str(rounds), "--out", out or name),
            *("--run-config", config),
        )

    def submit(name: str, rounds: int, out: str | None = None, extra: str = "") -> tuple[int, str]:
        proc, log = start(name, rounds, out, f"{run_config} {extra}")
        try:
            code = proc.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"fedlora submit did not finish: {log.read_text()[-3000:]}") from None
        return code, log.read_text()

    def finished(name: str, rounds: int, code: int, output: str) -> Path:
        out = tmp_path / name  # --out names a folder inside the server's --runs-dir
        assert code == 0 and f"run finished: {rounds} rounds, results in {out.resolve()}" in output, output[
            -3000:
        ]
        return out

    # The approved app (fedlora's own, as `fedlora submit` sends it) completes rounds
    # (4 for the runtime benchmark below, whose round times are averaged). Meanwhile a peer
    # behind a forwarder (an SSH tunnel's far end is 127.0.0.1 here) polls for ServerApp
    # tasks, and the outsider tries to stop the run.
    answers, polling = [], threading.Event()
    poller = threading.Thread(
        target=_poll_runtime_api, args=(superlink, certs.ca_cert, answers, polling), daemon=True
    )
    poller.start()
    rounds = 4 if os.environ.get(BENCH_RUNTIME) else 2
    approved_run, approved_log = start("run-approved", rounds)
    _wait_for(
        _line_or_exit(approved_run, approved_log, "Successfully started run"), deadline, "the run to start"
    )
    run_id = approved_log.read_text().split("Successfully started run ")[1].split()[0]
    stop = _flwr(outsider_home, "stop", run_id, outsider_conn)
    assert stop.returncode != 0 and "Authentication failed" in stop.stdout + stop.stderr, stop.stdout
    code = approved_run.wait(timeout=max(1, deadline - time.monotonic()))
    approved = finished("run-approved", rounds, code, approved_log.read_text())
    polling.set()
    poller.join(timeout=30)
    assert not outsider_marker.exists()
    refused = server_log.read_text()
    for route in ("register-node", "unregister-node", "start-run", "stop-run"):
        assert f"fedlora: refused /v1/control/{route} from 127.0.0.1: not the operator's token" in refused, (
            route
        )
    # Every call of the forwarded peer was refused (never a task), and each refusal logged.
    assert len(answers) >= 20 and set(answers) == {401}, answers
    line = "fedlora: refused /v1/runtime/{} from 127.0.0.1: not this SuperLink's own SuperExec or ServerApp"
    polls = len(answers) - 1  # less its one pull-task-input
    _wait_for(
        lambda: server_log.read_text().count(line.format("acquire-task")) == polls,
        time.monotonic() + 10,
        f"{polls} logged refusals",
    )
    assert line.format("pull-task-input") in server_log.read_text()
    assert list(state.glob("*/*.state"))
    before = _tree(state)

    # A run config names only folders inside the server's runs folder, and never a finished run's.
    # (Absolute paths and other escapes: test_bad_input's runs-root tests, on the same function.)
    summary = (approved / "summary.json").read_bytes()
    for name, out, reason in [
        ("escape", "../outside", "is not a folder inside the server's runs folder"),
        ("again", "run-approved", "already holds a run (finished)"),
    ]:
        code, output = submit(name, 1, out)
        refusal = output[output.find("fedlora: error: submit: run") :]
        assert code != 0 and "ended finished:failed" in refusal and "out-dir: " in refusal, output[-3000:]
        assert reason in refusal, output[-3000:]
    assert not (tmp_path.parent / "outside").exists() and (approved / "summary.json").read_bytes() == summary

    # A run config naming a folder of the server's own as data-dir (and no labels) would make
    # the ServerApp read it for its labels: a deployed server refuses, and reads nothing.
    secret = tmp_path / "server-folder"
    rows = [{"text": "t", "label": "SERVER-SECRET"}]
    write_client(secret / "x", rows, rows)
    nosy, nosy_log = start("nosy", 1, config=f"data-dir={secret} {_tiny_run_config()}")
    nosy.wait(timeout=max(1, deadline - time.monotonic()))
    said = nosy_log.read_text()
    assert "labels: a deployed server reads no client data" in said, said[-3000:]
    assert not any("SERVER-SECRET" in p.read_text() for p in (tmp_path / "nosy").rglob("*.json*"))

    # A run of another app: the device refuses it with an error reply and a log line.
    home = tmp_path / "operator-home"
    conn = write_flwr_home(home, superlink, root_cert=certs.ca_cert, token=token.read_text().strip())
    run = subprocess.run(
        [flower_script("flwr"), "run", str(rogue), conn, "--stream"],
        env=flower_env({"FLWR_HOME": str(home), "COLUMNS": "200"}),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    replies = json.loads((tmp_path / "replies.json").read_text())
    assert [r["code"] for r in replies] == [7]  # Flower's INVALID_FAB
    assert "is not approved on this device" in replies[0]["reason"]
    refusals = [line for line in node_log.read_text().splitlines() if "refused run" in line]
    assert len(refusals) == 1 and "is not approved on this device; nothing of it ran" in refusals[0]
    assert not marker.exists() and _tree(state) == before

    # Runs the device's policy refuses: a model it did not allow (a folder the server may
    # read, inside its runs folder), and less noise than its floor. Each message gets an
    # error reply naming the policy and a log line; nothing runs, its state stays as it was.
    model = tmp_path / "some-model"
    for part in load_base(RunConfig.from_flat({"model": "tiny-bert"}).model, 2):
        part.save_pretrained(model)
    for name, extra, reason in [
        ("run-model", f"model={model}", f"model '{model}' is not allowed on this device"),
        ("run-noise", "dp-noise-multiplier=0.5", "dp-noise-multiplier 0.5 is below this device's floor 0.8"),
    ]:
        code, output = submit(name, 1, extra=extra)
        assert code == 0, output[-3000:]
        events = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        errors = [e for e in events if e.get("event") == "client-error"]
        assert errors and all(f"PolicyRefused: policy: {reason}" in e["reason"] for e in errors), errors
        # One line for each of its messages: the round's train (whose error the server records) and evaluate.
        logged = [line for line in node_log.read_text().splitlines() if reason in line]
        assert len(logged) == 2 and all("nothing of it ran" in line for line in logged), logged
    assert _tree(state) == before
    if not os.environ.get(BENCH_RUNTIME):
        return

    # Benchmark only (`simulations/bench_runtime.py`): the same rounds under Flower's
    # subprocess isolation (a ClientApp process per message), timed against fedlora's runtime.
    _signal_group(node.pid, signal.SIGTERM)
    assert node.wait(timeout=30) in (0, 130, 143)
    config = node_config(tmp_path / "data", state_dir=tmp_path / "state-flower")
    flower_node, flower_log = processes.start(
        "flower-node",
        *supernode_command(
            superlink,
            root_cert=certs.ca_cert,
            key=keys[1],
            config=config,
            port=free_port(),
            own_runtime=False,
        )[1:],
        program=(flower_script("flower-supernode"),),
    )
    _wait_for(_line_or_exit(flower_node, flower_log, "SuperNode ID:"), deadline, "Flower's node to join")
    baseline = finished("run-subprocess", 4, *submit("run-subprocess", 4))
    ours, theirs = _round_seconds(approved), _round_seconds(baseline)
    ratio = (sum(ours) / len(ours)) / (sum(theirs) / len(theirs))
    print(f"round seconds: fedlora runtime {ours}, subprocess isolation {theirs}, ratio {ratio:.2f}")
