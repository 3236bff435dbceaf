"""Local training: tokenization, training and evaluation loops, DP-SGD steps, adapter-level work."""

from fedlora.train.loops import (
    EvalResult,
    Tokenized,
    TrainResult,
    batch_loss,
    evaluate,
    sample_batches,
    tokenize,
    train_steps,
)

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
