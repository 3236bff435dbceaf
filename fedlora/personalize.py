"""A client's local work: train the shared adapter, then its personal one, and evaluate both.

The personal adapter follows the two-adapter design of FedDPA (Yang et al., NeurIPS 2024):
the shared (``global``) adapter is trained alone on local data and sent (`train_shared`);
when a new global adapter arrives, the personal adapter is trained further on top of it,
frozen (`train_personal`), and never leaves the client. Personalized predictions use both
LoRA deltas, summed, and the personal task head.

The personal head is stored as an offset from the global head, so that it follows the
federation's head as that improves instead of going stale.
"""

from __future__ import annotations

from fedlora.adapters import AdapterState, activate, adapter_state, load_adapter_state
from fedlora.config import TrainConfig
from fedlora.models import GLOBAL, PERSONAL, LoadedModel
from fedlora.train import EvalResult, Tokenized, TrainResult, evaluate, train_steps

__all__ = [
    "evaluate_round",
    "initial_personal",
    "local_only",
    "train_personal",
    "train_shared",
]


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


def _train(
    loaded: LoadedModel, train: Tokenized, names: list[str], steps: int, cfg: TrainConfig, seed: int
) -> TrainResult:
    # Adapters in ``names`` compute; only the last one trains.
    activate(loaded.model, names, trainable=names[-1:])
    return train_steps(
        loaded.model,
        train,
        steps=steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        seed=seed,
    )


def train_shared(
    loaded: LoadedModel, train: Tokenized, global_state: AdapterState, cfg: TrainConfig, *, seed: int
) -> tuple[AdapterState, TrainResult]:
    """Train the shared adapter alone for ``local_steps``: what the client sends back."""
    load_adapter_state(loaded.model, GLOBAL, global_state)
    result = _train(loaded, train, [GLOBAL], cfg.local_steps, cfg, seed)
    return adapter_state(loaded.model, GLOBAL), result


def train_personal(
    loaded: LoadedModel,
    train: Tokenized,
    global_state: AdapterState,
    personal_state: AdapterState | None,
    cfg: TrainConfig,
    *,
    seed: int,
) -> tuple[AdapterState, TrainResult | None]:
    """Train the personal adapter for ``personal_steps`` on top of the frozen ``global_state``.

    Returns the personal adapter in stored form (head as an offset from the global head).
    """
    stored = personal_state if personal_state is not None else initial_personal(loaded)
    if not cfg.personal_steps:
        return stored, None
    load_adapter_state(loaded.model, GLOBAL, global_state)
    load_adapter_state(loaded.model, PERSONAL, _head_plus(stored, global_state, +1.0))
    result = _train(loaded, train, [GLOBAL, PERSONAL], cfg.personal_steps, cfg, seed)
    return _head_plus(adapter_state(loaded.model, PERSONAL), global_state, -1.0), result


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
    load_adapter_state(loaded.model, GLOBAL, loaded.initial_global)
    result = _train(loaded, train, [GLOBAL], steps, cfg, seed)
    activate(loaded.model, [GLOBAL], trainable=[])
    return result, evaluate(loaded.model, test)
