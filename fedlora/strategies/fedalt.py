"""FedALT (Bian et al., AAAI 2026): each client is sent the Rest-of-World mean of the others' LoRAs.

Clients never restart from an aggregate: each trains its own individual LoRA on across
rounds and uploads it (`fedlora.personalization.fedalt`). The server keeps every node's
latest accepted upload with its weight (``num-examples`` as screened and capped by the
server) and sends each node, in its training and its evaluation messages alike, its
Rest-of-World (RoW) LoRA: the weighted mean of the other nodes' latest uploads, its own
left out. A node that has uploaded nothing yet gets the mean of all uploads; before any
upload (the first round) every node gets the seeded initial adapter, and so does a node
that is the only one to have uploaded (a federation of one client), whose rest of the
world has nothing to say (the initial adapter's B is zero: its RoW delta is zero).

The server's global adapter (saved each round, and the round's "global" arrays) is the
weighted mean of every node's latest upload: the RoW LoRA of a client new to the run.
The paper averages the others uniformly; with equal ``num-examples`` this is the same.
A node keeps its place in the means until it uploads again, also when it stops answering.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora.core import keys
from fedlora.lora.adapters import from_record, to_record
from fedlora.lora.protocol import ClientProtocol
from fedlora.strategies.base import flower_kwargs
from fedlora.strategies.registry import register

if TYPE_CHECKING:
    import torch

    from fedlora.config import RunConfig
    from fedlora.lora.adapters import AdapterState

__all__ = ["FedALT", "build_fedalt"]

_SEP = "/"  # "<node id>/<tensor key>": one flat mapping of tensors, as a checkpoint stores them


class FedALT(FedAvg):
    """FedAvg's sampling, with a message per node carrying its Rest-of-World LoRA.

    Parameters
    ----------
    cfg : RunConfig
        The run's configuration.

    """

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(**flower_kwargs(cfg))
        # Every node's latest accepted upload ("<node>/<key>") and its weight ("<node>").
        self.uploads: dict[str, torch.Tensor] = {}
        self.weights: dict[str, float] = {}
        # The arrays of the run's first round: the RoW LoRA of a node alone in the world.
        self.initial: dict[str, torch.Tensor] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample as FedAvg does; send each sampled node its RoW LoRA."""
        if not self.initial:
            self.initial = from_record(arrays)
        return self._rest_of_world(super().configure_train(server_round, arrays, config, grid))

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample as FedAvg does; each node evaluates against its RoW LoRA."""
        return self._rest_of_world(super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep each valid upload as its node's latest; the global arrays are the mean of all nodes'."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        for m in valid:
            node = str(m.metadata.src_node_id)
            # The server's checks let through only the strategy's keys: an upload replaces the last.
            upload = from_record(m.content[self.arrayrecord_key])  # type: ignore[arg-type]
            self.uploads.update((node + _SEP + k, v) for k, v in upload.items())
            self.weights[node] = float(m.content.metric_records[keys.METRICS][self.weighted_by_key])  # type: ignore[arg-type]
        contents = [m.content for m in valid]
        return to_record(self.rest_of_world()), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    def rest_of_world(self, node: int | None = None) -> AdapterState:
        """The weighted mean of every node's latest upload but ``node``'s (None: of all of them).

        With no other node's upload, the first round's arrays.
        """
        return self._leaving_out(self._weighted_sum(), node)

    def _weighted_sum(self) -> tuple[dict[str, torch.Tensor], float]:
        """``sum_n w_n u_n`` per tensor key (float64) over every node's latest upload, and ``sum_n w_n``."""
        sums: dict[str, torch.Tensor] = OrderedDict()
        for name, tensor in self.uploads.items():
            node, key = name.split(_SEP, 1)
            weighted = self.weights[node] * tensor.double()
            sums[key] = sums[key] + weighted if key in sums else weighted
        return sums, sum(self.weights.values())

    def _leaving_out(self, summed: tuple[dict[str, torch.Tensor], float], node: int | None) -> AdapterState:
        """The weighted mean of ``summed`` without ``node``'s upload: one subtraction, not a new sum."""
        sums, total = summed
        own = self.weights.get(str(node), 0.0)
        if total - own <= 0:
            return OrderedDict((k, v.clone()) for k, v in self.initial.items())
        return OrderedDict(
            (k, ((s - own * self.uploads[f"{node}{_SEP}{k}"].double() if own else s) / (total - own)).float())
            for k, s in sums.items()
        )

    def _rest_of_world(self, messages: Iterable[Message]) -> list[Message]:
        """The messages FedAvg built (one shared payload), each given its node's own RoW LoRA."""
        messages = list(messages)
        if not self.weights:  # the first round: every node starts from the initial adapter
            return messages
        summed = self._weighted_sum()
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            content = RecordDict(
                {
                    self.arrayrecord_key: to_record(self._leaving_out(summed, node)),
                    self.configrecord_key: m.content.config_records[self.configrecord_key],
                }
            )
            out.append(Message(content=content, message_type=m.metadata.message_type, dst_node_id=node))
        return out


@register(
    "fedalt",
    family="lora",
    protocol=ClientProtocol(),
    paper="Bian et al., AAAI 2026 (arXiv:2503.11880)",
    personalization="fedalt",
    description=(
        "keeps each client's latest individual LoRA; sends each client the weighted mean of the *other* "
        "clients' (its Rest-of-World LoRA), so no client restarts from an aggregate; the saved global "
        "adapter is the mean of all"
    ),
    exact_note="A and B averaged apart; each client's RoW leaves its own LoRA out",
    summary=(
        "each client trains its own LoRA on, next to the frozen mean of the other clients' "
        "(Rest-of-World), mixed per token (personalization fedalt)"
    ),
)
def build_fedalt(cfg: RunConfig) -> FedALT:
    """FedALT's server: a RoW LoRA per node, neither a plain mean (client-level DP) nor a sum (SecAgg+)."""
    return FedALT(cfg)
