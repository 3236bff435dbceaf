"""Recording a round's evaluation: every client's metrics, and the round's means over clients."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fedlora.config import CAUSAL_TASKS
from fedlora.core import keys
from fedlora.core.rundir import ClientRecord, RoundRecord
from fedlora.server.recorder import perplexity, worst_fraction_mean, worst_perplexity
from fedlora.server.replies import value

__all__ = ["client_record", "record_evaluation"]


def _optional(m: Mapping[str, Any], key: str, present: bool) -> float | None:
    return value(m, key) if present else None


def client_record(m: Mapping[str, Any]) -> ClientRecord:
    """One client's evaluation metrics (as it sent them) as its record in the results."""
    dp = not math.isnan(value(m, keys.M_EPSILON))  # DP-SGD: epsilon spent so far
    audited = keys.M_MIA_GLOBAL in m  # the final round's membership-inference audit
    canary = not math.isnan(value(m, keys.M_CANARY_GLOBAL))
    return ClientRecord(
        global_accuracy=value(m, keys.M_ACCURACY_GLOBAL),
        personalized_accuracy=value(m, keys.M_ACCURACY_PERSONALIZED),
        num_test_examples=value(m, keys.M_NUM_EXAMPLES),
        personal_rounds=value(m, keys.M_PERSONAL_ROUNDS),
        global_loss=value(m, keys.M_LOSS_GLOBAL),
        personalized_loss=value(m, keys.M_LOSS_PERSONALIZED),
        epsilon=_optional(m, keys.M_EPSILON, dp),
        # Whether the next round would break the budget.
        budget_exhausted=bool(value(m, keys.M_BUDGET_EXHAUSTED) == 1) if dp else None,
        mia_advantage_global=_optional(m, keys.M_MIA_GLOBAL, audited),
        mia_advantage_personalized=_optional(m, keys.M_MIA_PERSONALIZED, audited),
        mia_advantage_chance=_optional(m, keys.M_MIA_CHANCE, audited),
        mia_examples=_optional(m, keys.M_MIA_EXAMPLES, audited),
        canary_exposure_global=_optional(m, keys.M_CANARY_GLOBAL, canary),
        canary_exposure_personalized=_optional(m, keys.M_CANARY_PERSONALIZED, canary),
        gain_over_global=value(m, keys.M_GAIN_GLOBAL),
        gain_over_global_se=value(m, keys.M_GAIN_GLOBAL_SE),
        mix_weight=_optional(m, keys.M_MIX_WEIGHT, keys.M_MIX_WEIGHT in m),
    )


def record_evaluation(
    record: RoundRecord, clients: Sequence[tuple[str, Mapping[str, Any]]], task: str = "classification"
) -> None:
    """Fill ``record`` from each client's evaluation metrics: ``(client id, metrics)`` pairs.

    For causal LMs the round's perplexities are recorded too.
    """
    record.per_client = {cid: client_record(m).to_dict() for cid, m in clients}
    for name in (
        "mia_advantage_global",
        "mia_advantage_personalized",
        "mia_advantage_chance",
        "mia_examples",
        "canary_exposure_global",
        "canary_exposure_personalized",
    ):
        values = [c[name] for c in record.per_client.values() if name in c and not math.isnan(c[name])]
        setattr(record, name, sum(values) / len(values) if values else math.nan)
    spent = [c["epsilon"] for c in record.per_client.values() if "epsilon" in c]
    record.epsilon_max = max(spent) if spent else math.nan
    glob = [c["global_accuracy"] for c in record.per_client.values()]
    record.evaluated = any(not math.isnan(a) for a in glob)
    if record.evaluated:
        counts = [c.get("num_test_examples", math.nan) for c in record.per_client.values()]
        record.held_out_examples = int(sum(n for n in counts if not math.isnan(n)))
    pers = [c["personalized_accuracy"] for c in record.per_client.values()]
    # Personalization papers report the unweighted mean over clients: every user counts once.
    record.global_accuracy = sum(glob) / len(glob) if glob else math.nan
    record.personalized_accuracy = sum(pers) / len(pers) if pers else math.nan
    record.global_accuracy_worst10 = worst_fraction_mean(glob)
    if task in CAUSAL_TASKS:
        for model in ("global", "personalized"):
            losses = [c[f"{model}_loss"] for c in record.per_client.values()]
            setattr(record, f"{model}_perplexity", perplexity(losses))
            setattr(record, f"{model}_perplexity_worst10", worst_perplexity(losses))
    record.personalized_accuracy_worst10 = worst_fraction_mean(pers)
