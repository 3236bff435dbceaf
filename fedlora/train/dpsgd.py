"""DP-SGD (Abadi et al., CCS 2016) on the trainable adapter tensors, with Opacus.

Each step samples every example independently with probability ``q = batch / n``
(Poisson sampling, which the accountants assume), clips each example's gradient to
``max_grad_norm`` and adds Gaussian noise of standard deviation ``noise_multiplier *
max_grad_norm`` before the optimizer step. Only trainable tensors (LoRA and head of one
adapter) get per-example gradients; the frozen base model costs nothing extra.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedlora.train import Tokenized, TrainResult
from fedlora.train import TrainResult, batch_loss

__all__ = ["DPSettings", "dp_train_steps"]


@dataclass(frozen=True)
class DPSettings:
    """One client's DP-SGD parameters for a run of steps."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    secure_mode: bool = False


def dp_train_steps(
    model: Any,
    data: Tokenized,
    *,
    steps: int,
    learning_rate: float,
    seed: int,
    dp: DPSettings,
) -> TrainResult:
    """Run ``steps`` DP-SGD steps (AdamW on the privatized gradient) on the model's trainable tensors.

    The model is wrapped for per-example gradients for the duration of the call only, so
    a process-wide cached model can be wrapped again by the next client.
    """
    import torch  # noqa: PLC0415 - heavy: torch
    from opacus import GradSampleModule  # noqa: PLC0415 - heavy: opacus
    from opacus.optimizers import DPOptimizer  # noqa: PLC0415 - heavy: opacus

    from fedlora.models.device import model_device  # noqa: PLC0415 - heavy: torch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("dp_train_steps: the model has no trainable parameters")
    n = len(data)
    device = model_device(model)  # wrapped where it already is: Opacus' hooks follow the model
    model.train()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    optimizer = DPOptimizer(
        torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0),
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=max(1, round(dp.sample_rate * n)),
        secure_mode=dp.secure_mode,
    )
    start, total, examples = time.perf_counter(), 0.0, 0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            for _ in range(steps):
                chosen = (torch.rand(n, generator=generator) < dp.sample_rate).nonzero().flatten().tolist()
                # An empty Poisson batch still takes a (noise-only) step: the accountant counts it.
                batch = {k: v.to(device) for k, v in data.batch(chosen or [0]).items()}
                loss = batch_loss(wrapped, batch) * (1.0 if chosen else 0.0)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                examples += len(chosen)
    finally:
        wrapped._close()
        for p in params:
            p.grad_sample = None
        model.eval()
    return TrainResult(total / max(steps, 1), steps, examples, time.perf_counter() - start)
