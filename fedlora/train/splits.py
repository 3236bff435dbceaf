"""A client's split tokenized for its task, the same way wherever it is read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedlora.data.chat import decode
from fedlora.train.chat import template_for, tokenize_chat
from fedlora.train.loops import Tokenized, tokenize

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from fedlora.config import ModelConfig

__all__ = ["tokenize_split"]


def tokenize_split(
    tokenizer: PreTrainedTokenizerBase,
    cfg: ModelConfig,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    where: str,
) -> Tokenized:
    """``texts`` (and, for classification, ``labels``) tokenized for ``cfg.task``.

    ``task=chat`` texts are conversations (`fedlora.data.chat.encode`), rendered by the
    chat template with the loss on the assistant's tokens (`tokenize_chat`); ``where``
    names the split in its messages.

    Raises
    ------
    DataError
        ``task=chat``: no chat template, or no conversation fits ``max-length``.

    """
    if cfg.task == "chat":
        template = template_for(tokenizer, cfg.chat_template, cfg.model)
        return tokenize_chat(tokenizer, [decode(t) for t in texts], cfg.max_length, template, where=where)
    return tokenize(tokenizer, texts, labels if cfg.task == "classification" else None, cfg.max_length)
