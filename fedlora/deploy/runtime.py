"""The device's ClientApp runtime: only approved FABs, and always the device's own fedlora code.

``fedlora client`` starts the SuperNode with ``--isolation process`` and this module
(``python -m fedlora.deploy.runtime``) as a second, long-lived process beside it. For each
ClientApp task on the SuperNode's local Runtime API it pulls the message, context, run and
FAB (Flower App Bundle) and

* refuses the task, with an ``INVALID_FAB`` error reply and a log line, unless the sha256
  of the FAB's bytes is on the device's allowlist; or
* runs the device's own installed ``fedlora.client_app:app``. The FAB is never unpacked,
  installed or imported: only its run config (fused by the SuperNode into the context)
  and the message reach the app.

The allowlist holds the FAB that ``fedlora submit`` sends for this fedlora version (Flower
builds FABs deterministically: `fedlora_fab_hash`) and the hashes given with
``--allow-fab-hash``. With ``--superexec-auth-secret-file`` (the SuperNode's own), no
other local process can claim the node's tasks. One process serves every task, so the
model's libraries are imported once.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import logging
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
from flwr.app import Error, Message
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedlora.config import RunConfig
from fedlora.launch import write_app

__all__ = ["CLIENT_APP", "DeviceRuntime", "fedlora_fab_hash", "main"]

CLIENT_APP = "fedlora.client_app:app"
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"
_COMPONENT = "fedlora-runtime"

log = logging.getLogger("fedlora.deploy.runtime")


def fedlora_fab_hash() -> str:
    """The sha256 of the FAB that ``fedlora submit`` of this fedlora version sends.

    Returns
    -------
    str
        The hex digest of Flower's build of `fedlora.launch.write_app`'s app folder.

    """
    with tempfile.TemporaryDirectory(prefix="fedlora-fab-") as tmp:
        return hashlib.sha256(build_fab_from_disk(write_app(Path(tmp) / "app", RunConfig()))).hexdigest()


class DeviceRuntime:
    """Serves a SuperNode's ClientApp tasks with the device's installed app, approved FABs only.

    Parameters
    ----------
    address : str
        The SuperNode's local Runtime API, ``host:port``.
    allow : Iterable[str]
        The sha256 hex digests of the FABs this device runs.
    secret : bytes or None
        The SuperNode's SuperExec auth secret; None if it has none.
    app : str
        The installed ClientApp, ``module:attribute``.
    poll : float
        Seconds between two requests for a task while there is none.

    """

    def __init__(
        self,
        address: str,
        *,
        allow: Iterable[str],
        secret: bytes | None = None,
        app: str = CLIENT_APP,
        poll: float = 0.2,
    ) -> None:
        self.address = address
        self.allow = frozenset(h.lower() for h in allow)
        self.app_ref = app
        self.poll = poll
        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=_COMPONENT)]
        if secret:
            interceptors.append(
                SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={_ACQUIRE})
            )
        self._acquirer = self._client(interceptors)
        self._app: Any = None

    def _client(self, interceptors: list[Any]) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,  # the SuperNode's Runtime API listens on this machine only
            root_certificates=None,
            interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker(),
        )

    def _installed_app(self) -> Any:
        if self._app is None:  # imported on the first approved task, once
            module, _, attribute = self.app_ref.partition(":")
            self._app = getattr(importlib.import_module(module), attribute)
        return self._app

    def serve_forever(self) -> None:
        """Acquire and handle the SuperNode's ClientApp tasks until the process is stopped."""
        log.info("serving the ClientApp tasks of %s; %d approved FAB(s)", self.address, len(self.allow))
        while True:
            res = self._acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
            if res.HasField("task") and res.token:
                self.handle(res.token)
            else:
                time.sleep(self.poll)

    def handle(self, token: str) -> None:
        """Run, or refuse, the task that ``token`` names; push its reply and its output.

        Parameters
        ----------
        token : str
            The task's token from ``AcquireTask``.

        """
        started = time.monotonic()
        client = self._client(
            [RuntimeVersionHttpInterceptor(component_name=_COMPONENT), RuntimeTokenHttpInterceptor(token)]
        )

        def beat() -> bool:  # unlike Flower's, never stops this long-lived process
            try:
                client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
            except httpx.HTTPError:
                return False
            return True

        heart = HeartbeatSender(beat)
        heart.start()
        message: Message | None = None
        context: Any = None
        reply: Message | None = None
        sub_status, details = SubStatus.FAILED, "task failed"
        try:
            message, context, run, fab = pull_task_input(client)
            digest = hashlib.sha256(fab.content).hexdigest()  # the bytes, not the hash it claims
            if digest not in self.allow:
                details = f"FAB {digest} is not approved on this device"
                log.error(
                    "refused run %s: FAB %s (%s) is not approved on this device; nothing of it ran",
                    run.run_id,
                    digest,
                    run.fab_id or "no id",
                )
                reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=details), reply_to=message)
            else:
                reply = self._installed_app()(message=message, context=context)
                sub_status, details = SubStatus.COMPLETED, ""
                log.info(
                    "run %s: %s answered %s in %.2f s",
                    run.run_id,
                    self.app_ref,
                    message.metadata.message_type,
                    time.monotonic() - started,
                )
        except Exception as err:  # one failed task must not end the runtime
            log.exception("task failed")
            details = type(err).__name__
            if message is not None:
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message
                )
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            finally:
                heart.stop()
                push_task_output(client, context, sub_status, details)
                client.close()


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value.lower())


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fedlora.deploy.runtime``: serve a SuperNode's tasks (see the module's docstring).

    Parameters
    ----------
    argv : Sequence[str] or None
        The command line (default ``sys.argv[1:]``).

    """
    parser = argparse.ArgumentParser(description="fedlora's ClientApp runtime for a SuperNode")
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's HOST:PORT")
    parser.add_argument("--superexec-auth-secret-file", help="the SuperNode's SuperExec auth secret")
    parser.add_argument(
        "--allow-fab-hash", action="append", default=[], help="sha256 of another approved FAB (repeatable)"
    )
    args = parser.parse_args(argv)
    bad = [h for h in args.allow_fab_hash if not _is_sha256(h)]
    if bad:
        parser.error(f"--allow-fab-hash: not a sha256 hex digest: {bad[0]!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    own = fedlora_fab_hash()
    log.info("approved FAB %s (fedlora's own app)", own)
    for extra in args.allow_fab_hash:
        log.info("approved FAB %s (--allow-fab-hash)", extra)
    secret = Path(args.superexec_auth_secret_file).read_bytes() if args.superexec_auth_secret_file else None
    try:
        DeviceRuntime(
            args.runtime_api_address, allow=[own, *args.allow_fab_hash], secret=secret
        ).serve_forever()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
