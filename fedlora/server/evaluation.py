"""Recording a round's evaluation: every client's metrics, and the round's means over clients."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedlora.core import keys
from fedlora.core.rundir import RoundRecord
from fedlora.server.recorder import perplexity, worst_fraction_mean
from fedlora.server.replies import value

__all__ = ["record_evaluation"]


def record_evaluation(
    record: RoundRecord, clients: Sequence[tuple[str, Mapping[str, Any]]], task: str = "classification"
) -> None:
    """Fill ``record`` from each client's evaluation metrics: ``(client id, metrics)`` pairs.

    For causal LMs the round's perplexities are recorded too.
    """
    record.per_client = {
        cid: {
            "global_accuracy": value(m, keys.M_ACCURACY_GLOBAL),
            "personalized_accuracy": value(m, keys.M_ACCURACY_PERSONALIZED),
            "num_test_examples": value(m, keys.M_NUM_EXAMPLES),
            "personal_rounds": value(m, keys.M_PERSONAL_ROUNDS),
            "global_loss": value(m, keys.M_LOSS_GLOBAL),
            "personalized_loss": value(m, keys.M_LOSS_PERSONALIZED),
            # With DP: epsilon spent so far, and whether the next round would break the budget.
            **(
                {
                    "epsilon": value(m, keys.M_EPSILON),
                    "budget_exhausted": bool(value(m, keys.M_BUDGET_EXHAUSTED) == 1),
                }
                if not math.isnan(value(m, keys.M_EPSILON))
                else {}
            ),
            # Final round: membership-inference advantage against the global / personalized model.
            **(
                {
                    "mia_advantage_global": value(m, keys.M_MIA_GLOBAL),
                    "mia_advantage_personalized": value(m, keys.M_MIA_PERSONALIZED),
                    "mia_advantage_chance": value(m, keys.M_MIA_CHANCE),
                }
                if keys.M_MIA_GLOBAL in m
                else {}
            ),
            **(
                {
                    "canary_exposure_global": value(m, keys.M_CANARY_GLOBAL),
                    "canary_exposure_personalized": value(m, keys.M_CANARY_PERSONALIZED),
                }
                if not math.isnan(value(m, keys.M_CANARY_GLOBAL))
                else {}
            ),
        }
        for cid, m in clients
    }
    for name in (
        "mia_advantage_global",
        "mia_advantage_personalized",
        "mia_advantage_chance",
        "canary_exposure_global",
        "canary_exposure_personalized",
    ):
        values = [c[name] for c in record.per_client.values() if name in c and not math.isnan(c[name])]
        setattr(record, name, sum(values) / len(values) if values else math.nan)
    spent = [c["epsilon"] for c in record.per_client.values() if "epsilon" in c]
    record.epsilon_max = max(spent) if spent else math.nan
    glob = [c["global_accuracy"] for c in record.per_client.values()]
    pers = [c["personalized_accuracy"] for c in record.per_client.values()]
    # Personalization papers report the unweighted mean over clients: every user counts once.
    record.global_accuracy = sum(glob) / len(glob) if glob else math.nan
    record.personalized_accuracy = sum(pers) / len(pers) if pers else math.nan
    record.global_accuracy_worst10 = worst_fraction_mean(glob)
    if task == "causal-lm":
        record.global_perplexity = perplexity([c["global_loss"] for c in record.per_client.values()])
        record.personalized_perplexity = perplexity(
            [c["personalized_loss"] for c in record.per_client.values()]
        )
    record.personalized_accuracy_worst10 = worst_fraction_mean(pers)
