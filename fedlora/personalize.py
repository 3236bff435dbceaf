"""A client's local work: train the shared adapter, then its personal one, and evaluate both.

The personal adapter follows the two-adapter design of FedDPA (Yang et al., NeurIPS 2024):
the shared (``global``) adapter is trained alone on local data and sent; the personal
adapter is then trained on top of the frozen global one and never leaves the client.
Personalized predictions use both LoRA deltas, summed, and the personal task head.

The personal head is stored as an offset from the global head, so that it follows the
federation's head as that improves instead of going stale.
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
    """A client's round: the updated shared adapter (sent) and personal adapter (kept).

    ``personal_state`` is in stored form: LoRA tensors as they are, head as an offset.
    """

    global_state: AdapterState
    personal_state: AdapterState
    shared: TrainResult
    personal: TrainResult | None


def _is_head(key: str) -> bool:
    return "lora_" not in key


def initial_personal(loaded: LoadedModel) -> AdapterState:
    """The stored personal adapter on a client's first round: fixed LoRA init, zero head offset."""
    return {
        key: value.clone() if not _is_head(key) else value.new_zeros(value.shape)
        for key, value in loaded.initial_personal.items()
    }


def _head_plus(stored: AdapterState, global_state: AdapterState, sign: float) -> AdapterState:
    # Head tensors: usable = global + offset (sign=+1); offset = usable - global (sign=-1).
    return {k: v + sign * global_state[k] if _is_head(k) else v for k, v in stored.items()}


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
    stored = personal_state if personal_state is not None else initial_personal(loaded)
    load_adapter_state(model, GLOBAL, global_state)

    activate(model, [GLOBAL], trainable=[GLOBAL])
    shared = train_steps(
        model,
        train,
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        seed=seed,
    )
    new_global = adapter_state(model, GLOBAL)
    personal = None
    if cfg.personal_steps:
        # The personal adapter trains on top of the global adapter this client received.
        load_adapter_state(model, GLOBAL, global_state)
        load_adapter_state(model, PERSONAL, _head_plus(stored, global_state, +1.0))
        activate(model, [GLOBAL, PERSONAL], trainable=[PERSONAL])
        personal = train_steps(
            model,
            train,
            steps=cfg.personal_steps,
            batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate,
            seed=seed + 1,
        )
        stored = _head_plus(adapter_state(model, PERSONAL), global_state, -1.0)
    return RoundOutput(new_global, stored, shared, personal)


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
    load_adapter_state(model, PERSONAL, _head_plus(personal_state, global_state, +1.0))
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
        model,
        train,
        steps=steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        seed=seed,
    )
    activate(model, [GLOBAL], trainable=[])
    return result, evaluate(model, test)
