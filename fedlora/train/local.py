"""A client's local work shared by every method: train the shared adapter, evaluate, local-only."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING

from fedlora.config import TrainConfig
from fedlora.lora.adapters import AdapterState, activate, adapter_state, load_adapter_state, proximal_term
from fedlora.models import GLOBAL, LoadedModel
from fedlora.train import EvalResult, Schedule, Tokenized, TrainResult, evaluate, train_steps

if TYPE_CHECKING:
    import torch

    from fedlora.train.dpsgd import DPSettings
from fedlora.train.dpsgd import dp_train_steps

__all__ = ["evaluate_adapter", "local_only", "train_adapter", "train_shared", "use_adapter"]


def train_adapter(
    loaded: LoadedModel,
    train: Tokenized,
    names: list[str],
    steps: int,
    cfg: TrainConfig,
    *,
    seed: int,
    frozen: Collection[str] = (),
    regularizer: Callable[[], torch.Tensor] | None = None,
    dp: DPSettings | None = None,
    progress: tuple[int, int] = (1, 1),
    extra: Collection[torch.nn.Parameter] = (),
) -> TrainResult:
    """Train the last adapter in ``names`` (all of them compute) for ``steps`` steps.

    With ``dp``, the steps are DP-SGD steps (`fedlora.train.dpsgd`). ``progress`` is
    ``(server_round, rounds)``: where these steps fall in the learning-rate schedule.
    ``extra`` parameters of the model outside its adapters train too (FedALT's mixer gates,
    `fedlora.lora.mixer`).
    """
    activate(loaded.model, names, trainable=names[-1:], frozen=frozen)
    for param in extra:
        param.requires_grad_(True)
    if dp is not None:
        if regularizer is not None:
            raise ValueError("train_adapter: DP-SGD with a regulariser is not supported")

        return dp_train_steps(
            loaded.model, train, steps=steps, learning_rate=cfg.learning_rate, seed=seed, dp=dp
        )
    return train_steps(
        loaded.model,
        train,
        steps=steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        seed=seed,
        regularizer=regularizer,
        precision=loaded.config.precision,
        micro_batch_size=cfg.micro_batch_size,
        schedule=Schedule.for_round(cfg.lr_schedule, cfg.lr_warmup_fraction, *progress, steps),
    )


def train_shared(
    loaded: LoadedModel,
    train: Tokenized,
    start: AdapterState,
    cfg: TrainConfig,
    *,
    seed: int,
    frozen: Collection[str] = (),
    proximal_mu: float = 0.0,
    dp: DPSettings | None = None,
    progress: tuple[int, int] = (1, 1),
) -> tuple[AdapterState, TrainResult]:
    """Train the shared adapter alone for ``local_steps`` from ``start``: what the client sends back.

    ``frozen`` parts stay at ``start`` (FFA-LoRA's A); ``proximal_mu > 0`` adds FedProx's
    ``mu/2 ||w - start||^2``; ``dp`` makes the steps DP-SGD steps.
    """
    load_adapter_state(loaded.model, GLOBAL, start)
    activate(loaded.model, [GLOBAL], trainable=[GLOBAL], frozen=frozen)
    regularizer = proximal_term(loaded.model, GLOBAL, start, proximal_mu) if proximal_mu > 0 else None
    result = train_adapter(
        loaded,
        train,
        [GLOBAL],
        cfg.local_steps,
        cfg,
        seed=seed,
        frozen=frozen,
        regularizer=regularizer,
        dp=dp,
        progress=progress,
    )
    return adapter_state(loaded.model, GLOBAL), result


def use_adapter(loaded: LoadedModel, state: Mapping[str, torch.Tensor], name: str = GLOBAL) -> None:
    """Make one adapter, loaded from ``state``, the only one that computes."""
    load_adapter_state(loaded.model, name, dict(state))
    activate(loaded.model, [name], trainable=[])


def evaluate_adapter(
    loaded: LoadedModel, test: Tokenized, state: Mapping[str, torch.Tensor], name: str = GLOBAL
) -> EvalResult:
    """Held-out metrics of one adapter alone, loaded from ``state``."""
    use_adapter(loaded, state, name)
    return evaluate(loaded.model, test, precision=loaded.config.precision)


def local_only(
    loaded: LoadedModel, train: Tokenized, test: Tokenized, steps: int, cfg: TrainConfig, *, seed: int
) -> tuple[TrainResult, EvalResult]:
    """Baseline: one adapter trained from the common start on this client's data alone."""
    loaded.set_base_delta({})
    load_adapter_state(loaded.model, GLOBAL, loaded.initial_global)
    result = train_adapter(loaded, train, [GLOBAL], steps, cfg, seed=seed)
    activate(loaded.model, [GLOBAL], trainable=[])
    return result, evaluate(loaded.model, test, precision=loaded.config.precision)
