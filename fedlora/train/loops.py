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
    "Comparison",
    "EvalResult",
    "Schedule",
    "Tokenized",
    "TrainResult",
    "backward_batch",
    "batch_loss",
    "compare",
    "micro_batches",
    "evaluate",
    "sample_batches",
    "tokenize",
    "train_steps",
]


# Rows of causal-LM logits turned into float32 at once in `evaluate`.
_LM_ROWS = 4


@dataclass(frozen=True)
class Tokenized:
    """A tokenized split: ``input_ids``/``attention_mask`` (N, L) and ``labels`` (N,) or None.

    ``loss_mask`` (N, L), for chat: 1 on the tokens the next-token loss counts (the
    assistant's), 0 elsewhere; None: every real token counts.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    loss_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def subset(self, indices: Sequence[int]) -> Tokenized:
        """The given rows only."""
        import torch  # noqa: PLC0415 - heavy: torch

        idx = torch.as_tensor(list(indices), dtype=torch.long)
        labels = self.labels[idx] if self.labels is not None else None
        loss_mask = self.loss_mask[idx] if self.loss_mask is not None else None
        return Tokenized(self.input_ids[idx], self.attention_mask[idx], labels, loss_mask)

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Model inputs for the given rows, trimmed to their longest sequence."""
        import torch  # noqa: PLC0415 - heavy: torch

        idx = torch.as_tensor(list(indices), dtype=torch.long)
        mask = self.attention_mask[idx]
        width = int(mask.sum(dim=1).max())
        out = {"input_ids": self.input_ids[idx, :width], "attention_mask": mask[:, :width]}
        if self.labels is not None:
            out["labels"] = self.labels[idx]
        if self.loss_mask is not None:
            out[LOSS_MASK] = self.loss_mask[idx, :width]
        return out


# The batch key of a `Tokenized.loss_mask`; never passed to the model.
LOSS_MASK = "loss_mask"


def loss_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, L): which tokens of a causal-LM batch the loss counts (its loss mask, else every real token)."""
    return batch.get(LOSS_MASK, batch["attention_mask"])


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model takes from a batch: everything but the loss mask."""
    return {k: v for k, v in batch.items() if k != LOSS_MASK}


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
    # Each example's accuracy (its share of correctly predicted tokens for causal LMs).
    example_accuracies: tuple[float, ...] = ()


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


@dataclass(frozen=True)
class Schedule:
    """The learning-rate multiplier of each local step, along the whole federation.

    A client's ``steps`` steps of round ``r`` (of ``rounds``) are steps ``(r-1)*steps``
    to ``r*steps - 1`` of ``rounds*steps``: ``cosine`` decays the rate to 0 over them,
    and the first ``warmup_fraction`` of them rise linearly from 0. The default is flat.
    """

    kind: str = "constant"
    warmup_fraction: float = 0.0
    start: int = 0
    total: int = 1

    @classmethod
    def for_round(
        cls, kind: str, warmup_fraction: float, server_round: int, rounds: int, steps: int
    ) -> Schedule:
        """The schedule of ``steps`` local steps in ``server_round`` (1-based) of ``rounds``."""
        return cls(kind, warmup_fraction, (max(server_round, 1) - 1) * steps, max(rounds * steps, 1))

    def __call__(self, step: int) -> float:
        """The multiplier of this call's ``step`` (0-based)."""
        done = self.start + step
        warm = self.warmup_fraction * self.total
        if done < warm:
            return (done + 1) / (warm + 1)
        if self.kind == "cosine":
            progress = (done - warm) / max(self.total - warm, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0


def micro_batches(
    batch: dict[str, torch.Tensor], size: int
) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
    """Split ``batch`` into row chunks of at most ``size`` (0: whole), each with its share of the loss.

    The shares make the chunks' weighted losses add up to the whole batch's mean loss:
    examples for classification, predicted tokens for causal LMs (the model's loss is a
    mean over the batch's target tokens).
    """
    rows = int(batch["input_ids"].shape[0])
    if size <= 0 or size >= rows:
        yield batch, 1.0
        return
    classify = "labels" in batch
    targets = loss_tokens(batch)[:, 1:].sum(dim=1)  # tokens each row predicts
    total = float(targets.sum()) if not classify else float(rows)
    for lo in range(0, rows, size):
        chunk = {k: v[lo : lo + size] for k, v in batch.items()}
        share = (
            len(chunk["input_ids"]) / rows
            if classify
            else float(targets[lo : lo + size].sum()) / max(total, 1.0)
        )
        yield chunk, share


def backward_batch(
    model: Any,
    batch: dict[str, torch.Tensor],
    micro_batch_size: int = 0,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """Add the gradient of ``batch``'s mean loss to the trainable tensors; return the loss.

    In micro-batches of at most ``micro_batch_size`` rows (0: at once), each loss weighted
    by its share, so the gradient is the whole batch's; on the model's device, autocast to
    ``precision``; through ``scaler`` (fp16's loss scaling) if given.
    """
    from fedlora.models.device import autocast, model_device  # noqa: PLC0415 - heavy: torch
    from fedlora.models.lean import uncast_lora_inputs  # noqa: PLC0415 - heavy: torch

    device = model_device(model)
    loss = 0.0
    for chunk, share in micro_batches(batch, micro_batch_size):
        with autocast(precision, device), uncast_lora_inputs(model, precision):
            part = batch_loss(model, {k: v.to(device) for k, v in chunk.items()}) * share
        (scaler.scale(part) if scaler is not None else part).backward()
        loss += float(part.detach())
    return loss


# Causal LMs whose logits are exactly ``lm_head(last hidden state)``: their next-token loss
# is computed a few tokens at a time (see `_chunked_lm_loss`).
_PLAIN_LM_HEADS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2"})
_LM_TOKENS = 128  # predicted tokens whose logits exist at once in `_chunked_lm_loss`


def batch_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean loss of one batch: cross-entropy for classification, next-token loss for causal LMs."""
    if "labels" in batch:
        return model(**batch).loss
    inner = model.get_base_model() if hasattr(model, "get_base_model") else None
    if inner is not None and getattr(inner.config, "model_type", "") in _PLAIN_LM_HEADS:
        return _chunked_lm_loss(inner, batch)
    labels = batch["input_ids"].masked_fill(loss_tokens(batch) == 0, -100)
    return model(**model_inputs(batch), labels=labels).loss


def _chunked_lm_loss(inner: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own next-token loss, without ever holding the whole batch's logits.

    The (tokens x vocabulary) logits are the largest tensors of a small LM's step (a 49k
    vocabulary: 75 MB per 384 tokens in float32, more in the loss's copies and gradients).
    Here the LM head runs on ``_LM_TOKENS`` predicted tokens at a time, recomputed in the
    backward pass (activation checkpointing), and only those tokens (not padding) count:
    the same mean as transformers' loss, in float32.
    """
    import torch  # noqa: PLC0415 - heavy: torch
    from torch.utils.checkpoint import checkpoint  # noqa: PLC0415 - heavy: torch

    hidden = inner.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    head = inner.get_output_embeddings()
    targets = batch["input_ids"][:, 1:].masked_fill(loss_tokens(batch)[:, 1:] == 0, -100).reshape(-1)
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    kept = (targets != -100).nonzero().squeeze(1)
    states, targets = states[kept], targets[kept]

    def summed(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(head(h).float(), t, reduction="sum")

    total = sum(
        checkpoint(summed, states[lo : lo + _LM_TOKENS], targets[lo : lo + _LM_TOKENS], use_reentrant=False)
        for lo in range(0, len(targets), _LM_TOKENS)
    )
    return total / max(len(targets), 1)


def train_steps(
    model: Any,
    data: Tokenized,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    regularizer: Callable[[], torch.Tensor] | None = None,
    precision: str = "fp32",
    micro_batch_size: int = 0,
    schedule: Schedule | None = None,
) -> TrainResult:
    """Run ``steps`` AdamW steps on the model's trainable parameters.

    A fresh optimizer is built on every call: the model may be a process-wide cached
    object shared by many clients, whose trainable tensors were just overwritten.
    ``regularizer`` (e.g. a proximal term) is added to every batch loss. Batches go to the
    model's device; ``precision`` ``bf16``/``fp16`` autocasts the forward pass (fp16 with
    a gradient scaler); ``micro_batch_size`` accumulates each step's gradient over chunks
    of the batch (the same update, less memory); ``schedule`` scales the rate per step.
    """
    import torch  # noqa: PLC0415 - heavy: torch

    from fedlora.models.device import model_device  # noqa: PLC0415 - heavy: torch

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("train_steps: the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    device = model_device(model)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    model.train()
    start, total, examples = time.perf_counter(), 0.0, 0
    # Dropout draws from torch's RNG: seed it so that a round is reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step, indices in enumerate(sample_batches(len(data), batch_size, steps, seed)):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate * (schedule(step) if schedule is not None else 1.0)
            optimizer.zero_grad(set_to_none=True)
            loss = backward_batch(model, data.batch(indices), micro_batch_size, precision, scaler)
            if regularizer is not None:
                penalty = regularizer()
                scaler.scale(penalty).backward()
                loss += float(penalty.detach())
            scaler.step(optimizer)
            scaler.update()
            total += loss
            examples += len(indices)
    model.eval()
    return TrainResult(total / max(steps, 1), steps, examples, time.perf_counter() - start)


def evaluate(model: Any, data: Tokenized, *, batch_size: int = 32, precision: str = "fp32") -> EvalResult:
    """Held-out loss and accuracy of the model as it is currently activated, on its device.

    Losses are computed in float32 from the logits whatever the ``precision``.
    """
    import torch  # noqa: PLC0415 - heavy: torch

    model.eval()
    tally = _Tally()
    with torch.no_grad():
        for batch in _batches(model, data, batch_size):
            out = _forward(model, batch, precision)
            for logits, target, keep in _chunks(model, out, batch, precision, _LM_ROWS):
                logp = torch.log_softmax(logits, dim=-1)
                tally.add(_at(logp, target), logp.argmax(-1) == target, keep)
    return tally.result(len(data))


@dataclass(frozen=True)
class Comparison:
    """Two setups of one model measured on the same examples, and a mixture of their predictions.

    ``mixed`` predicts with ``(1 - weight) * p_first + weight * p_second`` (the two models'
    probabilities). ``first_logp`` and ``second_logp`` hold each counted target's log-probability
    under either model, in the same order: enough to score any other mixture's loss
    (`mixture_loss`). For classification, ``first_all`` and ``second_all`` hold every class's
    log-probability (N, C) and ``labels`` the targets, for any mixture's accuracy.
    """

    first: EvalResult
    second: EvalResult
    mixed: EvalResult
    weight: float
    first_logp: torch.Tensor
    second_logp: torch.Tensor
    first_all: torch.Tensor | None = None
    second_all: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def mixture_loss(self, weight: float) -> float:
        """Mean held-out loss of the mixture with this ``weight`` on the second setup."""
        if not len(self.first_logp):
            return math.nan
        return float(-_mix(self.first_logp, self.second_logp, weight).mean())

    def mixture_accuracy(self, weight: float) -> float:
        """Classification: the accuracy of the mixture with this ``weight`` (NaN for causal LMs)."""
        if self.first_all is None or self.second_all is None or self.labels is None or not len(self.labels):
            return math.nan
        predicted = _mix(self.first_all, self.second_all, weight).argmax(-1)
        return float((predicted == self.labels).float().mean())

    def best_weight(self, grid: Sequence[float]) -> float:
        """The weight of ``grid`` whose mixture scores best; the smallest of equal ones.

        Best is the highest accuracy, then the lowest loss, for classification (the
        figure a classifier is judged by); the lowest loss for causal LMs.
        """
        if not len(self.first_logp):
            return min(grid)

        def rank(weight: float) -> tuple[float, float]:
            accuracy = self.mixture_accuracy(weight)
            return (0.0 if math.isnan(accuracy) else -round(accuracy, 9), round(self.mixture_loss(weight), 9))

        best = min(rank(w) for w in grid)
        return min(w for w in grid if rank(w) == best)


def compare(
    model: Any,
    data: Tokenized,
    first: Callable[[], None],
    second: Callable[[], None],
    *,
    weight: float = 0.5,
    batch_size: int = 32,
    precision: str = "fp32",
) -> Comparison:
    """Measure two setups of ``model`` (``first()`` and ``second()`` make each current) batch by batch.

    Each batch is run under both setups, so that their predictions of the same tokens can
    be mixed; the mixture with ``weight`` is measured on the way.
    """
    import torch  # noqa: PLC0415 - heavy: torch

    model.eval()
    tallies = (_Tally(), _Tally(), _Tally())
    logps: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    every: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] = ([], [], [])
    with torch.no_grad():
        for batch in _batches(model, data, batch_size):
            first()
            out_first = _forward(model, batch, precision)
            second()
            out_second = _forward(model, batch, precision)
            for (logits_a, target, keep), (logits_b, _, _) in zip(
                _chunks(model, out_first, batch, precision, 1),
                _chunks(model, out_second, batch, precision, 1),
                strict=True,
            ):
                lp_a, lp_b = torch.log_softmax(logits_a, dim=-1), torch.log_softmax(logits_b, dim=-1)
                del logits_a, logits_b
                mixed = _mix(lp_a, lp_b, weight)
                for tally, logp in zip(tallies, (lp_a, lp_b, mixed), strict=True):
                    tally.add(_at(logp, target), logp.argmax(-1) == target, keep)
                counted = keep.bool()
                logps[0].append(_at(lp_a, target)[counted])
                logps[1].append(_at(lp_b, target)[counted])
                if "labels" in batch:  # classification: every class, for any mixture's accuracy
                    for kept, part in zip(
                        every, (lp_a[counted], lp_b[counted], target[counted]), strict=True
                    ):
                        kept.append(part)
    first_r, second_r, mixed_r = (t.result(len(data)) for t in tallies)
    cat = [torch.cat(lp) if lp else torch.zeros(0) for lp in logps]
    classes = [torch.cat(part) if part else None for part in every]
    return Comparison(first_r, second_r, mixed_r, weight, cat[0], cat[1], *classes)


def _at(logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(b, T): the log-probability of each target token (or label)."""
    return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def _mix(logp_a: torch.Tensor, logp_b: torch.Tensor, weight: float) -> torch.Tensor:
    """log((1 - weight) * exp(logp_a) + weight * exp(logp_b)), exact at weights 0 and 1."""
    import torch  # noqa: PLC0415 - heavy: torch

    if weight <= 0.0:
        return logp_a
    if weight >= 1.0:
        return logp_b
    return torch.logaddexp(logp_a + math.log1p(-weight), logp_b + math.log(weight))


class _Tally:
    """Per-example sums of token losses, correct predictions and counted tokens."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.correct: list[float] = []
        self.counted: list[float] = []

    def add(self, target_logp: torch.Tensor, right: torch.Tensor, keep: torch.Tensor) -> None:
        """One chunk of rows: (b, T) target log-probabilities, hits and the tokens that count."""
        keep = keep.to(target_logp.dtype)
        self.losses += (-(target_logp * keep)).sum(1).tolist()
        self.correct += (right.to(keep.dtype) * keep).sum(1).tolist()
        self.counted += keep.sum(1).tolist()

    def result(self, num_examples: int) -> EvalResult:
        counted = sum(self.counted)
        if counted == 0:
            return EvalResult(math.nan, math.nan, 0)
        per_loss = tuple(s / max(n, 1.0) for s, n in zip(self.losses, self.counted, strict=True))
        per_right = tuple(c / max(n, 1.0) for c, n in zip(self.correct, self.counted, strict=True))
        loss, accuracy = sum(self.losses) / counted, sum(self.correct) / counted
        return EvalResult(loss, accuracy, num_examples, per_loss, per_right)


def _batches(model: Any, data: Tokenized, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    from fedlora.models.device import model_device  # noqa: PLC0415 - heavy: torch

    device = model_device(model)
    for lo in range(0, len(data), batch_size):
        yield {k: v.to(device) for k, v in data.batch(range(lo, min(lo + batch_size, len(data)))).items()}


def _plain_head(model: Any) -> Any:
    """The inner model of a causal LM whose logits are ``lm_head(hidden)``, else None."""
    inner: Any = model.get_base_model() if hasattr(model, "get_base_model") else None
    return inner if inner is not None and getattr(inner.config, "model_type", "") in _PLAIN_LM_HEADS else None


def _forward(model: Any, batch: dict[str, torch.Tensor], precision: str) -> torch.Tensor:
    """The model's logits for the batch; for plain-head causal LMs, the last hidden states."""
    from fedlora.models.device import autocast, model_device  # noqa: PLC0415 - heavy: torch

    inner = _plain_head(model)
    with autocast(precision, model_device(model)):
        if inner is not None and "labels" not in batch:
            # Causal LM: the last hidden states; the logits a few rows at a time in `_chunks`.
            return inner.base_model(**model_inputs(batch))[0]
        return model(**model_inputs(batch)).logits


def _chunks(
    model: Any, out: torch.Tensor, batch: dict[str, torch.Tensor], precision: str, rows: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Float32 logits (b, T, K), targets (b, T) and counted tokens (b, T), ``rows`` rows at a time.

    Classification is one target per row (T = 1); causal LMs predict token t+1 at t, and
    their float32 logits (rows x L x vocabulary) are made a few rows at a time.
    """
    import torch  # noqa: PLC0415 - heavy: torch

    from fedlora.models.device import autocast, model_device  # noqa: PLC0415 - heavy: torch

    if "labels" in batch:
        labels = batch["labels"]
        yield out.float().unsqueeze(1), labels.unsqueeze(1), torch.ones_like(labels).unsqueeze(1)
        return
    inner = _plain_head(model)
    for row in range(0, batch["input_ids"].shape[0], rows):
        part = slice(row, row + rows)
        if inner is not None:
            with autocast(precision, model_device(model)):
                # Contiguous: a strided bfloat16 input takes a path that copies the head to float32.
                logits = inner.get_output_embeddings()(out[part, :-1].contiguous()).float()
        else:
            logits = out[part, :-1].float()
        yield logits, batch["input_ids"][part, 1:], loss_tokens(batch)[part, 1:]
