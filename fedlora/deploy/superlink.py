"""Flower's SuperLink with its Control API closed to all but the operator: ``python -m`` this.

``python -m fedlora.deploy.superlink --operator-token-file FILE [flower-superlink args]``
starts Flower 1.42's own ``flower-superlink`` with two of its hooks filled, and none of
Flower's files changed:

1. ``flwr.superlink.cli.flower_superlink.load_control_authn_plugin``, the factory the
   SuperLink calls once at startup for its Control API authentication, returns an
   `OperatorTokenPlugin`: Flower's Control middleware hands it the ``Authorization:
   Bearer`` token of every ``/v1/control/*`` request (register or unregister nodes, start,
   stop and list runs, read logs) and answers 401 unless it is the operator's.
2. ``flwr.superlink.main.create_app``, which builds the SuperLink's HTTP app, is wrapped to
   add `LocalOnlyRoutes`: the ServerApp's Runtime API (``/v1/runtime/*``) and the API
   pages answer only this machine, and every refused call is logged.

An address is no proof of who calls: behind an SSH tunnel or a TCP forwarder every remote
peer is 127.0.0.1. ``fedlora server`` therefore also starts the SuperLink with
``--isolation process --superexec-auth-secret-file FILE`` (a secret made at each start)
and runs the one ``flower-superexec`` that knows it: Flower's Runtime API hands a task
(``acquire-task``) only to a request signed with that secret, and every other Runtime
call needs the token of a task so acquired. `LocalOnlyRoutes` logs each such refusal.

`tests/test_deploy_security.py` checks that these names still exist in the installed Flower.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import importlib
import sys
from collections.abc import Awaitable, Callable, Sequence
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common.constant import ACCESS_TOKEN_KEY, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
from flwr.common.logger import log
from flwr.supercore.auth.typing import AccountAuthCredentials, AccountAuthLoginDetails, AccountInfo
from flwr.superlink.auth_plugin import ControlAuthnPlugin
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp

from fedlora.core.errors import ConfigError
from fedlora.deploy.operator_token import read_operator_token

__all__ = [
    "CONTROL_PREFIX",
    "LOCAL_ONLY_PREFIXES",
    "RUNTIME_PREFIX",
    "LocalOnlyRoutes",
    "OperatorTokenPlugin",
    "install_hooks",
    "main",
]

# `flwr.superlink.cli` re-exports a function named `flower_superlink`, which shadows its
# submodule as an attribute: the modules themselves are fetched by name.
FLOWER_SUPERLINK_CLI = "flwr.superlink.cli.flower_superlink"
FLOWER_SUPERLINK_MAIN = "flwr.superlink.main"

CONTROL_PREFIX = "/v1/control/"
RUNTIME_PREFIX = "/v1/runtime/"
LOCAL_ONLY_PREFIXES = (RUNTIME_PREFIX, "/docs", "/redoc", "/openapi.json")
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


class OperatorTokenPlugin(ControlAuthnPlugin):
    """Control API authentication by one bearer token, the operator's (kept as its sha256).

    Parameters
    ----------
    token : str
        The operator token (`fedlora.deploy.operator_token`).

    """

    def __init__(self, token: str) -> None:
        self._digest = _digest(token)

    def get_login_details(self) -> AccountAuthLoginDetails | None:
        """No ``flwr login`` flow: fedlora writes the operator's token for the CLI."""
        return None

    def validate_tokens_in_metadata(
        self, metadata: Sequence[tuple[str, str | bytes]]
    ) -> tuple[bool, AccountInfo | None]:
        """Accept exactly the operator's token (compared in constant time).

        Parameters
        ----------
        metadata : Sequence[tuple[str, str or bytes]]
            The request's credentials, as Flower's Control middleware passes them.

        Returns
        -------
        tuple[bool, AccountInfo or None]
            Whether the caller is the operator, and its account (Flower's open-source
            federation manager admits only its no-op account).

        """
        token = next((value for key, value in metadata if key == ACCESS_TOKEN_KEY), None)
        if token is None or not hmac.compare_digest(_digest(token), self._digest):
            return False, None
        return True, AccountInfo(flwr_aid=NOOP_FLWR_AID, account_name=NOOP_ACCOUNT_NAME)

    def get_auth_tokens(self, device_code: str) -> AccountAuthCredentials | None:
        """Never hand out a token (an unauthenticated route)."""
        return None

    def refresh_tokens(
        self, metadata: Sequence[tuple[str, str | bytes]]
    ) -> tuple[Sequence[tuple[str, str | bytes]] | None, AccountInfo | None]:
        """Refreshing is not supported: the operator's token does not expire."""
        return None, None


class LocalOnlyRoutes(BaseHTTPMiddleware):
    """Runtime API and API pages for this machine only; refused Control and Runtime calls logged.

    Parameters
    ----------
    app : ASGIApp
        The application it wraps.
    local : frozenset[str]
        Peer addresses of this machine: loopback, and the address the SuperLink listens on
        (Flower's own ServerApp process connects to that one).

    """

    def __init__(self, app: ASGIApp, local: frozenset[str] = _LOOPBACK) -> None:
        super().__init__(app)
        self.local = local

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """Refuse a local-only route to a remote peer (403); log a refused Control or Runtime call.

        Parameters
        ----------
        request : Request
            The incoming request.
        call_next : callable
            The rest of the application.

        Returns
        -------
        Response
            403 for a remote peer on a local-only route, else the application's answer.

        """
        path = request.url.path
        peer = request.client.host if request.client else ""
        if path.startswith(LOCAL_ONLY_PREFIXES) and peer not in self.local:
            log(WARNING, "fedlora: refused %s from %s: local-only route", path, peer)
            return PlainTextResponse("Forbidden", status_code=403)
        response = await call_next(request)
        if response.status_code == 401 and path.startswith(CONTROL_PREFIX):
            log(WARNING, "fedlora: refused %s from %s: not the operator's token", path, peer)
        elif response.status_code == 401 and path.startswith(RUNTIME_PREFIX):
            # Flower's answer to a task request without this start's SuperExec secret, or to
            # a call without the token of a task acquired with it.
            log(
                WARNING,
                "fedlora: refused %s from %s: not this SuperLink's own SuperExec or ServerApp",
                path,
                peer,
            )
        return response


def install_hooks(token: str, host: str) -> None:
    """Fill Flower's two SuperLink hooks (see the module's docstring); call before starting it.

    Parameters
    ----------
    token : str
        The operator token.
    host : str
        The address the SuperLink listens on (``--host``).

    """
    cli: Any = importlib.import_module(FLOWER_SUPERLINK_CLI)
    main_module: Any = importlib.import_module(FLOWER_SUPERLINK_MAIN)
    plugin = OperatorTokenPlugin(token)
    cli.load_control_authn_plugin = lambda: plugin
    local = _LOOPBACK | ({host.strip("[]")} if host not in ("0.0.0.0", "::", "[::]") else set())
    original = main_module.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)
        app.add_middleware(LocalOnlyRoutes, local=frozenset(local))  # outermost
        return app

    main_module.create_app = create_app


def main(argv: Sequence[str] | None = None) -> None:
    """Start ``flower-superlink`` with ``argv`` (less ``--operator-token-file FILE``).

    Parameters
    ----------
    argv : Sequence[str] or None
        The command line (default ``sys.argv[1:]``).

    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--operator-token-file", required=True)
    parser.add_argument("--host", default="0.0.0.0")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    try:
        token = read_operator_token(Path(args.operator_token_file))
    except ConfigError as err:
        sys.exit(f"fedlora: {err}")
    install_hooks(token, args.host)
    sys.argv = ["flower-superlink", "--host", args.host, *rest]
    importlib.import_module(FLOWER_SUPERLINK_CLI).flower_superlink()


if __name__ == "__main__":
    main()
