"""What a client measures each evaluated round: the global and the personalized model, compared.

With ``personal-mix=validation`` the personalized model is a mixture of the two models'
predictions, ``(1 - w) * global + w * personalized``, with ``w`` chosen on the client's
validation split (held out of its personal training): by accuracy, then loss, for
classification; by loss for causal LMs. ``w = 0`` is the global model exactly, so a
personal part that does not help this client's held-out-like examples is turned down
rather than trusted.

Each comparison also carries its own noise: the mean paired difference over the client's
held-out examples (`Gain`) and its standard error, so that the server can tell a client
the personalized model helps from one where the two are tied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedlora.core.stats import Gain, paired_gain
from fedlora.train import EvalResult
from fedlora.train.local import evaluate_adapter, use_adapter
from fedlora.train.loops import compare

if TYPE_CHECKING:
    from fedlora.lora.adapters import AdapterState
    from fedlora.personalization import Local, Personalization

__all__ = ["MIX_GRID", "Gain", "Measured", "gain", "measure", "scores"]

# The mixture weights a client chooses from: 0 (the global model) to 1 (the personalized one).
MIX_GRID = tuple(i / 10 for i in range(11))


def gain(better: EvalResult | tuple[float, ...], than: EvalResult | tuple[float, ...], causal: bool) -> Gain:
    """The paired gain of ``better`` over ``than`` (results, or their `scores`) on the same examples."""
    a = better if isinstance(better, tuple) else scores(better, causal)
    b = than if isinstance(than, tuple) else scores(than, causal)
    return paired_gain(a, b)


def scores(result: EvalResult, causal: bool) -> tuple[float, ...]:
    """Each example's score, higher is better: its accuracy, or (causal LMs) its negated loss."""
    return tuple(-x for x in result.example_losses) if causal else result.example_accuracies


@dataclass(frozen=True)
class Measured:
    """One round's held-out measurement on a client.

    ``personalized`` is what the client predicts with: the mixture when mixing
    (``weight``, else None).
    """

    global_only: EvalResult
    personalized: EvalResult
    weight: float | None = None


def measure(
    method: Personalization,
    local: Local,
    stored: AdapterState | None,
    *,
    mix: bool,
) -> Measured:
    """Measure the global and the personalized model on ``local.test``.

    With ``mix``, the mixture weight is chosen on ``local.validation`` first (no validation
    examples: the global model, ``w = 0``); the personalized figure is the mixture's.
    """
    loaded, glob = local.loaded, local.view.global_state
    if method.same_as_global(local.cfg):
        only = evaluate_adapter(loaded, local.test, glob)
        return Measured(only, only, 0.0 if mix else None)
    if not mix:
        only = evaluate_adapter(loaded, local.test, glob)
        return Measured(only, method.evaluate(local, stored))

    def use_global() -> None:
        use_adapter(loaded, glob)

    def use_personalized() -> None:
        method.prepare(local, stored)

    precision = loaded.config.precision
    model, weight = loaded.model, 0.0
    validation = local.validation
    if validation is not None and len(validation):
        on_validation = compare(model, validation, use_global, use_personalized, precision=precision)
        weight = on_validation.best_weight(MIX_GRID)
    on_test = compare(model, local.test, use_global, use_personalized, weight=weight, precision=precision)
    return Measured(on_test.first, on_test.mixed, weight)
