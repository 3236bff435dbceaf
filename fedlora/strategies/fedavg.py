"""FedAvg over the shared adapter's A, B and head tensors (FedIT: Zhang et al., ICASSP 2024).

Averaging A and B separately is the common baseline; it is not the average of the
updates B_i A_i (see the exactness tests).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fedlora import keys
from fedlora.config import RunConfig
from fedlora.strategies.registry import register

__all__ = ["build_fedavg"]


@register("fedavg")
def build_fedavg(cfg: RunConfig) -> FedAvg:
    """Flower's FedAvg, weighted by each client's number of training examples."""
    fed = cfg.federation
    return FedAvg(
        fraction_train=fed.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=fed.min_clients,
        weighted_by_key=keys.M_NUM_EXAMPLES,
        arrayrecord_key=keys.ARRAYS,
        configrecord_key=keys.CONFIG,
    )
