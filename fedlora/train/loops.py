"""Local training and evaluation: plain PyTorch loops over tokenized client data."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "EvalResult",
    "Tokenized",
    "TrainResult",
    "batch_loss",
    "evaluate",
    "sample_batches",
    "tokenize",
    "train_steps",
]


@dataclass(frozen=True)
class Tokenized:
    """A tokenized split: ``input_ids``/``attention_mask`` (N, L) and ``labels`` (N,) or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Model inputs for the given rows, trimmed to their longest sequence."""
        import torch  # noqa: PLC0415 - heavy: torch

        idx = torch.as_tensor(list(indices), dtype=torch.long)
        mask = self.attention_mask[idx]
        width = int(mask.sum(dim=1).max())
        out = {"input_ids": self.input_ids[idx, :width], "attention_mask": mask[:, :width]}
        if self.labels is not None:
            out["labels"] = self.labels[idx]
        return out


@dataclass(frozen=True)
class TrainResult:
    """What a run of local steps did: mean loss, steps, examples seen, wall seconds."""

    loss: float
    steps: int
    examples: int
    wall_s: float


@dataclass(frozen=True)
class EvalResult:
    """Held-out loss and accuracy (next-token accuracy for causal LMs) over ``num_examples``."""

    loss: float
    accuracy: float
    num_examples: int
    # Each example's loss (mean over its tokens for causal LMs), for membership audits.
    example_losses: tuple[float, ...] = ()


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    labels: Sequence[int] | None,
    max_length: int,
) -> Tokenized:
    """Tokenize a split once; ``labels`` is None for causal LMs."""
    import torch  # noqa: PLC0415 - heavy: torch

    enc = tokenizer(
        list(texts), truncation=True, max_length=max_length, padding="longest", return_tensors="pt"
    )
    y = torch.as_tensor(list(labels), dtype=torch.long) if labels is not None else None
    return Tokenized(enc["input_ids"], enc["attention_mask"], y)


def sample_batches(n: int, batch_size: int, steps: int, seed: int) -> Iterator[list[int]]:
    """Yield ``steps`` batches of row indices, reshuffling at each pass over the data."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < min(batch_size, n):
            fresh = list(range(n))
            rng.shuffle(fresh)
            order.extend(fresh)
        take, order = order[: min(batch_size, n)], order[min(batch_size, n) :]
        yield take


def batch_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean loss of one batch: cross-entropy for classification, next-token loss for causal LMs."""
    if "labels" in batch:
        return model(**batch).loss
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(**batch, labels=labels).loss


def train_steps(
    model: Any,
    data: Tokenized,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    regularizer: Callable[[], torch.Tensor] | None = None,
) -> TrainResult:
    """Run ``steps`` AdamW steps on the model's trainable parameters.

    A fresh optimizer is built on every call: the model may be a process-wide cached
    object shared by many clients, whose trainable tensors were just overwritten.
    ``regularizer`` (e.g. a proximal term) is added to every batch loss.
    """
    import torch  # noqa: PLC0415 - heavy: torch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("train_steps: the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    model.train()
    start, total, examples = time.perf_counter(), 0.0, 0
    # Dropout draws from torch's RNG: seed it so that a round is reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for indices in sample_batches(len(data), batch_size, steps, seed):
            loss = batch_loss(model, data.batch(indices))
            if regularizer is not None:
                loss = loss + regularizer()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            examples += len(indices)
    model.eval()
    return TrainResult(total / max(steps, 1), steps, examples, time.perf_counter() - start)


def evaluate(model: Any, data: Tokenized, *, batch_size: int = 32) -> EvalResult:
    """Held-out loss and accuracy of the model as it is currently activated."""
    import torch  # noqa: PLC0415 - heavy: torch

    model.eval()
    loss_sum, correct, counted = 0.0, 0, 0
    per_example: list[float] = []
    with torch.no_grad():
        for lo in range(0, len(data), batch_size):
            batch = data.batch(range(lo, min(lo + batch_size, len(data))))
            if "labels" in batch:
                logits = model(**batch).logits  # (B, num_labels)
                losses = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
                per_example += losses.tolist()
                loss_sum += float(losses.sum())
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
                counted += int(batch["labels"].numel())
            else:
                logits = model(**batch).logits[:, :-1]  # (B, L-1, V): predicts token t+1
                target = batch["input_ids"][:, 1:]
                keep = batch["attention_mask"][:, 1:]
                token_losses = torch.nn.functional.cross_entropy(
                    logits.transpose(1, 2), target, reduction="none"
                )  # (B, L-1)
                token_losses = token_losses * keep
                per_example += (token_losses.sum(1) / keep.sum(1).clamp(min=1)).tolist()
                loss_sum += float(token_losses.sum())
                mask = keep.bool()
                correct += int((logits.argmax(-1)[mask] == target[mask]).sum())
                counted += int(keep.sum())
    if counted == 0:
        return EvalResult(math.nan, math.nan, 0)
    return EvalResult(loss_sum / counted, correct / counted, len(data), tuple(per_example))
