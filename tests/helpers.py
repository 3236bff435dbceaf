"""Building Flower messages outside a running federation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity


def as_server() -> None:
    """Messages need a task identity; give the test process the server's."""
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1


def reply(content: RecordDict, node_id: int, message_type: str = "train") -> Message:
    """A reply as if ``node_id`` had answered a message of ``message_type``."""
    as_server()
    request = Message(content=RecordDict(), dst_node_id=node_id, message_type=message_type)
    answer = Message(content=content, reply_to=request)
    answer.metadata.__dict__["_src_node_id"] = node_id
    return answer


# A real federation small enough for the suite: `fedlora.run(**TINY_FEDERATION, ...)`.
TINY_FEDERATION = dict(
    clients=3,
    model="tiny-bert",
    max_length=16,
    local_steps=2,
    personal_steps=1,
    batch_size=8,
    local_only_baseline=False,
)


def metrics(**values: float) -> MetricRecord:
    return MetricRecord({k.replace("_", "-"): v for k, v in values.items()})


def simulate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``fedlora simulate ARGS`` in a fresh interpreter; fail the test unless it succeeds."""
    proc = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "simulate", *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def client_context(cfg, partition_id: int = 0) -> Context:
    """A simulated client's context: partition ``partition_id`` of 3, empty state, ``cfg``'s run config."""
    return Context(
        run_id=1,
        node_id=partition_id + 1,
        state=RecordDict(),
        run_config=cfg.to_flat(),
        node_config={"partition-id": partition_id, "num-partitions": 3},
    )


def session_processes(home: Path) -> dict[int, str]:
    """The processes carrying a Flower session's FLWR_HOME, by pid: their command lines."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"FLWR_HOME={home}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found
