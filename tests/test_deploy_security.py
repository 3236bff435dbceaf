"""The operator's token, the SuperLink launcher's hooks into Flower, and its local-only routes."""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from flwr.cli.constant import ACCESS_TOKEN_STORE_KEY, AUTHN_TYPE_STORE_KEY
from flwr.common.constant import ACCESS_TOKEN_KEY
from flwr.supercore.credential_store.file_credential_store import FileCredentialStore

from fedlora.core.errors import ConfigError
from fedlora.deploy import (
    Certificates,
    companion,
    ensure_operator_token,
    read_operator_token,
    superexec_command,
    superlink_command,
    write_flwr_home,
)
from fedlora.deploy.runtime import _ACQUIRE
from fedlora.deploy.superlink import (
    FLOWER_SUPERLINK_CLI,
    FLOWER_SUPERLINK_MAIN,
    LocalOnlyRoutes,
    OperatorTokenPlugin,
)


def test_flowers_private_names_the_launcher_relies_on_still_exist():
    # A Flower upgrade that renames or inlines either hook must fail here, loudly.
    cli = importlib.import_module(FLOWER_SUPERLINK_CLI)
    main = importlib.import_module(FLOWER_SUPERLINK_MAIN)
    assert callable(cli.load_control_authn_plugin) and callable(main.create_app)
    # The SuperLink looks both up when it starts, not when it is imported.
    assert "load_control_authn_plugin()" in inspect.getsource(cli._parse_superlink_lifespan_config)
    http_api = inspect.getsource(cli._run_superlink_http_api)
    assert "from flwr.superlink.main import" in http_api and "create_app(" in http_api
    assert "flower_superlink" in dir(cli)
    # The SuperLink keeps its SuperExec secret in process isolation only (subprocess: ignored).
    lifespan_config = inspect.getsource(cli._parse_superlink_lifespan_config)
    assert "ISOLATION_MODE_SUBPROCESS" in lifespan_config and "load_superexec_auth_secret(" in lifespan_config
    assert cli.ISOLATION_MODE_PROCESS == "process"


def test_flowers_runtime_api_gives_tasks_only_for_the_superexec_secret():
    # What `fedlora server`'s SuperExec setup relies on: acquiring a task needs the secret, and
    # every other Runtime call needs the token of a task so acquired.
    from flwr.supercore.dependencies.runtime import SuperExecAuthDependency, get_task
    from flwr.supercore.superexec import run_superexec

    router = importlib.import_module("flwr.supercore.routers.runtime.router").router
    responses = importlib.import_module("flwr.supercore.routers.runtime.responses")

    def guards(dependant):
        for dep in dependant.dependencies:
            if isinstance(dep.call, SuperExecAuthDependency):
                yield dep.call.method
            elif dep.call is get_task:
                yield "task token"
            yield from guards(dep)

    found = {route.path: set(guards(route.dependant)) for route in router.routes}
    acquire = "/flwr.proto.Runtime/AcquireTask"
    assert found.pop("/v1/runtime/acquire-task") == {acquire}
    assert len(found) >= 15 and all(g == {"task token"} for g in found.values()), found
    assert [r.path for r in responses.router.routes] == ["/v1/runtime/responses"]
    assert "run_in_threadpool(_authenticate, request" in inspect.getsource(responses.create_runtime_response)
    # Flower's own SuperExec signs exactly that call (so does fedlora's device runtime).
    assert run_superexec._SUPEREXEC_AUTH_METHODS == frozenset({acquire})
    assert _ACQUIRE == acquire


def test_operator_token_is_private_random_and_kept(tmp_path):
    path, new = ensure_operator_token(tmp_path / "certs" / "operator.token")
    assert new and stat.S_IMODE(path.stat().st_mode) == 0o600
    token = read_operator_token(path)
    assert len(token) >= 32
    assert ensure_operator_token(path) == (path, False) and read_operator_token(path) == token
    assert read_operator_token(ensure_operator_token(tmp_path / "other")[0]) != token
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ConfigError, match="at least 32 characters"):
        read_operator_token(tmp_path / "short")
    with pytest.raises(ConfigError, match="cannot read"):
        read_operator_token(tmp_path / "missing")


def test_plugin_accepts_only_the_operators_token():
    plugin = OperatorTokenPlugin("t" * 40)
    ok, account = plugin.validate_tokens_in_metadata([(ACCESS_TOKEN_KEY, "t" * 40)])
    assert ok and account is not None
    assert plugin.validate_tokens_in_metadata([(ACCESS_TOKEN_KEY, "t" * 39 + "u")]) == (False, None)
    assert plugin.validate_tokens_in_metadata([]) == (False, None)
    assert plugin.get_auth_tokens("code") is None and plugin.refresh_tokens([]) == (None, None)


def test_runtime_api_and_docs_answer_this_machine_only():
    app = FastAPI()
    for path in ("/v1/runtime/acquire-task", "/v1/fleet/pull-messages", "/docs"):
        app.add_api_route(path, lambda: {"ok": True}, methods=["GET"])
    app.add_middleware(LocalOnlyRoutes, local=frozenset({"127.0.0.1", "10.0.0.2"}))

    remote = TestClient(app, client=("203.0.113.9", 5000))
    assert remote.get("/v1/runtime/acquire-task").status_code == 403
    assert remote.get("/docs").status_code == 403
    assert remote.get("/v1/fleet/pull-messages").status_code == 200  # the devices' API
    for host in ("127.0.0.1", "10.0.0.2"):  # loopback, and the address the SuperLink listens on
        assert TestClient(app, client=(host, 5000)).get("/v1/runtime/acquire-task").status_code == 200


def test_superlink_runs_through_fedlora_launcher_with_the_token(tmp_path):
    certs = Certificates.in_dir(tmp_path)
    command = superlink_command(certs=certs, operator_token=tmp_path / "operator.token", host="127.0.0.1")
    assert command[:5] == [
        sys.executable,
        "-m",
        "fedlora.deploy.superlink",
        "--operator-token-file",
        str(tmp_path / "operator.token"),
    ]
    assert "--enable-supernode-auth" in command and command[command.index("--host") + 1] == "127.0.0.1"
    assert "--isolation" not in command  # without a secret: Flower starts the ServerApps itself

    secret = tmp_path / "private" / "superexec.secret"
    command = superlink_command(
        certs=certs, operator_token=tmp_path / "t", host="0.0.0.0", port=9, superexec_secret=secret
    )
    assert command[-5:] == [
        "--isolation",
        "process",
        "--superexec-auth-secret-file",
        str(secret),
        "--disable-runtime-dependency-installation",
    ]


def test_the_superlinks_own_superexec_reaches_it_on_this_machine_with_the_secret(tmp_path):
    secret = tmp_path / "superexec.secret"
    command = superexec_command(
        host="0.0.0.0", port=9092, root_cert=tmp_path / "ca.crt", superexec_secret=secret, parent_pid=42
    )
    assert Path(command[0]).name == "flower-superexec"
    assert command[1:] == [
        "--runtime-api-address",
        "127.0.0.1:9092",  # a SuperLink on every interface is reached on loopback (its certificate's SAN)
        "--root-certificates",
        str(tmp_path / "ca.crt"),
        "--superexec-auth-secret-file",
        str(secret),
        "--parent-pid",
        "42",
    ]
    assert superexec_command(host="::", port=1, root_cert=None, superexec_secret=secret)[1:4] == [
        "--runtime-api-address",
        "[::1]:1",
        "--insecure",
    ]
    assert (
        superexec_command(host="10.0.0.2", port=1, root_cert=None, superexec_secret=secret)[2] == "10.0.0.2:1"
    )
    # Flower's SuperExec accepts each of these flags.
    parser = importlib.import_module("flwr.supercore.cli.flower_superexec")._parse_args()
    args = parser.parse_args(command[1:])
    assert (args.runtime_api_address, args.superexec_auth_secret_file, args.parent_pid) == (
        "127.0.0.1:9092",
        str(secret),
        42,
    )
    assert not args.runtime_dependency_install


def test_runtime_refusals_are_logged_as_refusals(caplog):
    from fastapi.responses import PlainTextResponse

    app = FastAPI()
    app.add_api_route(
        "/v1/runtime/acquire-task", lambda: PlainTextResponse("no", status_code=401), methods=["POST"]
    )
    app.add_middleware(LocalOnlyRoutes)
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(caplog.handler)
    try:
        answer = TestClient(app, client=("127.0.0.1", 5000)).post("/v1/runtime/acquire-task")
    finally:
        flwr_logger.removeHandler(caplog.handler)
    assert answer.status_code == 401
    assert (
        "fedlora: refused /v1/runtime/acquire-task from 127.0.0.1: not this SuperLink's own SuperExec "
        "or ServerApp" in caplog.text
    )


def test_flwr_home_gets_the_token_in_flowers_credential_store(tmp_path):
    home = tmp_path / "home"
    write_flwr_home(home, "127.0.0.1:9092", root_cert=tmp_path / "ca.crt", token="s" * 43)
    path = home / "credentials.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(home.stat().st_mode) == 0o700
    store = FileCredentialStore(path)
    assert store.get(ACCESS_TOKEN_STORE_KEY % "127.0.0.1:9092") == b"s" * 43
    assert store.get(AUTHN_TYPE_STORE_KEY % "127.0.0.1:9092") == b"oidc"


def test_fedloras_own_fab_hash_is_that_of_the_app_submit_sends(tmp_path):
    import hashlib

    from flwr.cli.build import build_fab_from_disk

    from fedlora.config import RunConfig
    from fedlora.deploy.runtime import fedlora_fab_hash
    from fedlora.launch import write_app

    sent = hashlib.sha256(build_fab_from_disk(write_app(tmp_path / "elsewhere", RunConfig()))).hexdigest()
    assert fedlora_fab_hash() == sent == fedlora_fab_hash()  # Flower's FAB build is deterministic


def test_runtime_command_and_its_allowlist_flag(tmp_path):
    from fedlora.deploy import runtime_command
    from fedlora.deploy.runtime import main

    command = runtime_command(9100, superexec_secret=tmp_path / "s", allow_fab_hashes=["ab" * 32])
    assert command[1:] == [
        "-m",
        "fedlora.deploy.runtime",
        "--runtime-api-address",
        "127.0.0.1:9100",
        "--superexec-auth-secret-file",
        str(tmp_path / "s"),
        "--allow-fab-hash",
        "ab" * 32,
    ]
    with pytest.raises(SystemExit):
        main(["--runtime-api-address", "127.0.0.1:1", "--allow-fab-hash", "not-a-hash"])


def _starts(log: Path) -> list[int]:
    return [int(pid) for pid in log.read_text().split()] if log.exists() else []


def _until(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_companion_that_dies_is_restarted_with_a_growing_back_off_until_the_block_ends(tmp_path):
    # Prepare: a companion that notes each start's pid, then sleeps.
    log = tmp_path / "starts"
    script = f"import os, time; open({str(log)!r}, 'a').write(f'{{os.getpid()}} '); time.sleep(60)"
    reports: list[str] = []

    # Execute: kill it twice while the block lasts, then leave the block.
    with companion(
        [sys.executable, "-c", script],
        env=os.environ,
        echo=lambda line: None,
        restart_after=0.2,
        name="the runtime",
        report=reports.append,
    ) as current:
        _until(lambda: len(_starts(log)) == 1)
        first = current()
        assert _starts(log) == [first.pid]
        os.kill(first.pid, signal.SIGKILL)
        _until(lambda: len(_starts(log)) == 2)
        second = current()
        assert second.pid == _starts(log)[1] != first.pid and second.poll() is None
        second.terminate()  # a quick second death: the back-off doubles
        _until(lambda: len(_starts(log)) == 3)
        last = current()

    # Assert: each death reported, the back-off doubled, the last one stopped and not restarted.
    assert reports == [
        "the runtime was killed by signal 9; restarted it after 0.2 s",
        "the runtime was killed by signal 15; restarted it after 0.4 s",
    ]
    assert last.poll() is not None and first.poll() is not None
    time.sleep(0.6)
    assert len(_starts(log)) == 3


def test_a_companion_without_restarts_is_left_dead(tmp_path):
    reports: list[str] = []
    with companion(["true"], env=os.environ, echo=lambda line: None, report=reports.append) as current:
        assert current().wait(timeout=10) == 0
        time.sleep(0.3)
        assert current().returncode == 0
    assert reports == []


def test_sigterm_stops_the_supervised_process_and_its_companion_together(tmp_path):
    log = tmp_path / "starts"
    ready = tmp_path / "ready"
    sleeper = f"import os, time; open({str(log)!r}, 'a').write(f'{{os.getpid()}} '); time.sleep(60)"
    child = (
        "import pathlib, signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )
    parent = (
        "import os, sys\n"
        "from fedlora.deploy import companion, supervise\n"
        f"with companion([sys.executable, '-c', {sleeper!r}], env=os.environ, restart_after=0.1):\n"
        f"    sys.exit(supervise([sys.executable, '-c', {child!r}], env=os.environ))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        _until(lambda: ready.exists() and len(_starts(log)) == 1, 30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 7
        (pid,) = _starts(log)  # stopped, never restarted
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    finally:
        proc.kill()
