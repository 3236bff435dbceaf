"""Client-level DP (DP-FedAvg, McMahan et al., ICLR 2018) with Flower's strategy wrappers.

Each sampled client's whole update (its upload minus the global arrays it started from)
is clipped to ``client-dp-clipping-norm``, by the server (``server-clipping``) or by the
client before it uploads (``client-clipping``, Flower's ``fixedclipping_mod``); the
uniform mean of the clipped updates gets Gaussian noise of standard deviation
``noise_multiplier * clipping_norm / sampled``. Flower's RDP accountant composes one
Gaussian release per round without sampling amplification, so the epsilon reported holds
for any client whatever the sampling.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from flwr.serverapp import Grid

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy
    from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase

    from fedlora.config import RunConfig
from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)

__all__ = ["sampled_per_round", "wait_for_nodes", "with_client_dp"]


def wait_for_nodes(grid: Grid, minimum: int, timeout_s: float = 300.0) -> int:
    """Wait until ``minimum`` nodes are connected; return how many are."""
    deadline = time.monotonic() + timeout_s
    while True:
        count = len(list(grid.get_node_ids()))
        if count >= minimum or time.monotonic() > deadline:
            return count
        time.sleep(1.0)


def sampled_per_round(num_nodes: int, fraction_train: float) -> int:
    """How many clients FedAvg samples for training from ``num_nodes`` (min-train-nodes is 1)."""
    return max(int(num_nodes * fraction_train), 1)


def with_client_dp(
    strategy: Strategy, cfg: RunConfig, num_nodes: int
) -> DifferentialPrivacyFixedClippingBase:
    """Wrap ``strategy`` (a FedAvg-mean strategy) for client-level DP with server-side accounting.

    Parameters
    ----------
    strategy : Strategy
        Flower FedAvg (or a subclass that keeps FedAvg's aggregation), uniformly weighted.
    cfg : RunConfig
        The run's configuration; ``privacy.client_dp`` says where clipping happens.
    num_nodes : int
        The client population, of which ``fraction-train`` is sampled every round.

    """
    privacy = cfg.privacy
    budget = privacy.client_dp_epsilon_budget
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=privacy.dp_delta,
            population_size=num_nodes,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=None if math.isinf(budget) else budget,
        )
    )
    wrapper = (
        DifferentialPrivacyServerSideFixedClipping
        if privacy.client_dp == "server-clipping"
        else DifferentialPrivacyClientSideFixedClipping
    )
    return wrapper(
        strategy,
        privacy.client_dp_noise_multiplier,
        privacy.client_dp_clipping_norm,
        sampled_per_round(num_nodes, cfg.federation.fraction_train),
        accountant=accountant,
    )
