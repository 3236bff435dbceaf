"""The operator's token, the SuperLink launcher's hooks into Flower, and its local-only routes."""

from __future__ import annotations

import importlib
import inspect
import stat
import sys

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from flwr.cli.constant import ACCESS_TOKEN_STORE_KEY, AUTHN_TYPE_STORE_KEY
from flwr.common.constant import ACCESS_TOKEN_KEY
from flwr.supercore.credential_store.file_credential_store import FileCredentialStore

from fedlora.core.errors import ConfigError
from fedlora.deploy import (
    Certificates,
    ensure_operator_token,
    read_operator_token,
    superlink_command,
    write_flwr_home,
)
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
