"""Local training: tokenization, training and evaluation loops, DP-SGD steps, adapter-level work."""

from fedlora.train.loops import (
    EvalResult,
    Schedule,
    Tokenized,
    TrainResult,
    backward_batch,
    batch_loss,
    evaluate,
    micro_batches,
    sample_batches,
    tokenize,
    train_steps,
)

__all__ = [
    "EvalResult",
    "Schedule",
    "Tokenized",
    "TrainResult",
    "backward_batch",
    "batch_loss",
    "evaluate",
    "micro_batches",
    "sample_batches",
    "tokenize",
    "train_steps",
]
