"""A client's local work: train the shared adapter, then its personal one, and evaluate both.

The personal adapter follows the two-adapter design of FedDPA (Yang et al., NeurIPS 2024):
the shared (``global``) adapter is trained alone on local data and sent; the personal
adapter is then trained on top of the frozen global one and never leaves the client.
Personalized predictions use both LoRA deltas, summed, and the personal task head.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.adapters import AdapterState, activate, adapter_state, load_adapter_state
from fedlora.config import TrainConfig
from fedlora.models import GLOBAL, PERSONAL, LoadedModel
from fedlora.train import EvalResult, Tokenized, TrainResult, evaluate, train_steps

__all__ = ["RoundOutput", "evaluate_round", "initial_personal", "local_only", "train_round"]


@dataclass(frozen=True)
class RoundOutput:
    """A client's round: the updated shared adapter (sent) and personal adapter (kept)."""

    global_state: AdapterState
    personal_state: AdapterState
    shared: TrainResult
    personal: TrainResult | None


def initial_personal(loaded: LoadedModel, global_state: AdapterState) -> AdapterState:
    """The personal adapter on a client's first round: fixed LoRA init, head copied from global."""
    return {
        key: (value if "lora_" in key else global_state[key]).clone()
        for key, value in loaded.initial_personal.items()
    }


def train_round(
    loaded: LoadedModel,
    train: Tokenized,
    global_state: AdapterState,
    personal_state: AdapterState | None,
    cfg: TrainConfig,
    *,
    seed: int,
) -> RoundOutput:
    """Train the shared adapter for ``local_steps``, then the personal one for ``personal_steps``."""
    model = loaded.model
    load_adapter_state(model, GLOBAL, global_state)
    load_adapter_state(model, PERSONAL, personal_state or initial_personal(loaded, global_state))

    activate(model, [GLOBAL], trainable=[GLOBAL])
    shared = train_steps(
        model, train, steps=cfg.local_steps, batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, seed=seed,
    )
    personal = None
    if cfg.personal_steps:
        activate(model, [GLOBAL, PERSONAL], trainable=[PERSONAL])
        personal = train_steps(
            model, train, steps=cfg.personal_steps, batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate, seed=seed + 1,
        )
    return RoundOutput(adapter_state(model, GLOBAL), adapter_state(model, PERSONAL), shared, personal)


def evaluate_round(
    loaded: LoadedModel,
    test: Tokenized,
    global_state: AdapterState,
    personal_state: AdapterState | None,
) -> tuple[EvalResult, EvalResult]:
    """Held-out metrics of the global adapter alone and of global + personal."""
    model = loaded.model
    load_adapter_state(model, GLOBAL, global_state)
    activate(model, [GLOBAL], trainable=[])
    global_only = evaluate(model, test)
    if personal_state is None:
        return global_only, global_only
    load_adapter_state(model, PERSONAL, personal_state)
    activate(model, [GLOBAL, PERSONAL], trainable=[])
    return global_only, evaluate(model, test)


def local_only(
    loaded: LoadedModel, train: Tokenized, test: Tokenized, steps: int, cfg: TrainConfig, *, seed: int
) -> tuple[TrainResult, EvalResult]:
    """Baseline: one adapter trained from the common start on this client's data alone."""
    model = loaded.model
    load_adapter_state(model, GLOBAL, loaded.initial_global)
    activate(model, [GLOBAL], trainable=[GLOBAL])
    result = train_steps(
        model, train, steps=steps, batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, seed=seed,
    )
    activate(model, [GLOBAL], trainable=[])
    return result, evaluate(model, test)
