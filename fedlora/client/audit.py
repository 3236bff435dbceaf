"""The client's audits of the final models: membership inference and canary exposure.

Only the scalar results leave the client.
"""

from __future__ import annotations

import dataclasses
import math
import random

from fedlora.client.setup import Client, sample_rows
from fedlora.core import keys
from fedlora.lora.adapters import AdapterState
from fedlora.personalization import Local
from fedlora.privacy.audit import chance_advantage, loss_threshold_advantage
from fedlora.privacy.canary import alternatives, canary_text, exposure
from fedlora.train import EvalResult, Tokenized, tokenize
from fedlora.train.local import evaluate_adapter

__all__ = ["CANARY_ALTERNATIVES", "final_audit"]


# Canary audit: how many other secrets the canary is ranked against.
CANARY_ALTERNATIVES = 1000


def final_audit(
    client: Client,
    local: Local,
    stored: AdapterState | None,
    global_only: EvalResult,
    personalized: EvalResult,
    same: bool = False,
) -> dict[str, float]:
    """Audits of the final global and personalized models; only the scalars leave the client.

    Membership inference on every client: the losses of at most ``audit-examples``
    training examples against as many held-out ones (a seeded sample of each; the count
    is reported), and the canary's exposure on the client that holds it. ``same``: the
    personalized model is the global one, measured once.
    """

    def losses(data: Tokenized) -> tuple[tuple[float, ...], tuple[float, ...]]:
        on_global = evaluate_adapter(client.loaded, data, local.view.global_state)
        if same:
            return on_global.example_losses, on_global.example_losses
        on_personal = client.method.evaluate(dataclasses.replace(local, test=data), stored)
        return on_global.example_losses, on_personal.example_losses

    privacy, seed = client.cfg.privacy, client.cfg.federation.seed
    audit: dict[str, float] = {}
    if privacy.audit_examples:
        rng = random.Random(seed * 7919 + client.partition_id)
        train_rows = sample_rows(rng, len(client.train), privacy.audit_examples)
        test_rows = sample_rows(rng, len(global_only.example_losses), privacy.audit_examples)
        train_global, train_personal = losses(client.train.subset(train_rows))
        test_global = [global_only.example_losses[i] for i in test_rows]
        test_personal = [personalized.example_losses[i] for i in test_rows]
        audit = {
            keys.M_MIA_GLOBAL: loss_threshold_advantage(train_global, test_global),
            keys.M_MIA_PERSONALIZED: loss_threshold_advantage(train_personal, test_personal),
            keys.M_MIA_CHANCE: chance_advantage(len(train_global), len(test_global)),
            keys.M_MIA_EXAMPLES: len(train_rows) + len(test_rows),
        }
    if privacy.canary_repeats:
        # Flower's aggregation wants the same keys from every client: NaN where there is no canary.
        audit[keys.M_CANARY_GLOBAL] = audit[keys.M_CANARY_PERSONALIZED] = math.nan
    if privacy.canary_repeats and client.partition_id == privacy.canary_client:
        texts = [canary_text(seed), *alternatives(seed, CANARY_ALTERNATIVES)]
        probe = tokenize(client.loaded.tokenizer, texts, None, client.cfg.model.max_length)
        on_global, on_personal = losses(probe)
        audit[keys.M_CANARY_GLOBAL] = exposure(on_global[0], on_global[1:])
        audit[keys.M_CANARY_PERSONALIZED] = exposure(on_personal[0], on_personal[1:])
    return audit
