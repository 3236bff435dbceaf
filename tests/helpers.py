"""Building Flower messages outside a running federation."""

from __future__ import annotations

from flwr.app import Message, MetricRecord, RecordDict
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


def metrics(**values: float) -> MetricRecord:
    return MetricRecord({k.replace("_", "-"): v for k, v in values.items()})
