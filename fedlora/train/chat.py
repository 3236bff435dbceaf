"""Tokenizing conversations for a next-token loss on the assistant's tokens only.

Each conversation is rendered by a chat template: the tokenizer's own, or `PLAIN_TEMPLATE`
for tokenizers without one. Which tokens are the assistant's is read from the template
itself, not searched for in the text: for the i-th message, if it is the assistant's, its
span runs from the end of the conversation's first i messages rendered with the
generation prompt (everything the model sees before it answers) to the end of the first
i + 1 messages rendered; each token whose text starts inside such a span is counted.

Truncation keeps the response: a conversation longer than ``max_length`` tokens loses
its oldest tokens first. One whose last assistant turn does not fit in ``max_length``
with at least one token before it is dropped, and the number dropped is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from fedlora.core.errors import DataError
from fedlora.train.loops import Tokenized

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["PLAIN_TEMPLATE", "assistant_spans", "chat_prompt", "template_for", "tokenize_chat"]

log = logging.getLogger(__name__)

# fedlora's plain chat template (``chat-template=plain``), for tokenizers that carry none:
#   ### System:\n<content>\n\n   ### User:\n<content>\n\n   ### Assistant:\n<content><eos>\n\n
# The assistant's tokens are its content, the end-of-sequence token (if the tokenizer has
# one) and the blank line.
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}### Assistant:\n{{ m['content'] }}{{ eos_token or '' }}\n\n"
    "{% elif m['role'] == 'system' %}### System:\n{{ m['content'] }}\n\n"
    "{% else %}### User:\n{{ m['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)


def template_for(tokenizer: PreTrainedTokenizerBase, chat_template: str, model: str) -> str | None:
    """The template to render with: None for the tokenizer's own (``auto``), or the plain one.

    Raises
    ------
    DataError
        If ``auto`` is asked and the tokenizer has no chat template.

    """
    if chat_template == "plain":
        return PLAIN_TEMPLATE
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"chat-template: the tokenizer of model {model!r} has no chat template; set "
            "chat-template=plain for fedlora's plain template"
        )
    return None


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], template: str | None, prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=prompt
    )
    return str(text)


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], template: str | None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns, as the template makes them.

    Raises
    ------
    DataError
        If the template does not render a conversation's first messages as a prefix of
        the whole (then its turns cannot be told apart).

    """
    full = _render(tokenizer, messages, template, prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _prompt(tokenizer, messages[:i], template)
        through = _render(tokenizer, messages[: i + 1], template, prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                "chat-template: the template does not render the first turns of a conversation as "
                "the start of the whole, so the assistant's turns cannot be located; use chat-template=plain"
            )
        spans.append((len(before), len(through)))
    return full, spans


def chat_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], template: str | None
) -> str:
    """``messages`` rendered as the model sees them before it answers (with the generation prompt)."""
    return _render(tokenizer, messages, template, prompt=True)


def _prompt(tokenizer: Any, messages: Sequence[dict[str, str]], template: str | None) -> str:
    """What the model sees before it answers: ``messages`` rendered with the generation prompt."""
    try:
        return chat_prompt(tokenizer, messages, template)
    except Exception:  # a template may refuse an empty conversation
        if messages:
            raise
        return ""


def tokenize_chat(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Sequence[dict[str, str]]],
    max_length: int,
    template: str | None,
    *,
    where: str = "data",
) -> Tokenized:
    """Tokenize conversations with a loss mask on the assistant's tokens (see the module).

    Raises
    ------
    DataError
        If no conversation fits ``max_length`` (naming ``where``), or the template cannot
        be read (`assistant_spans`).

    """
    import torch  # noqa: PLC0415 - heavy: torch

    rows: list[tuple[list[int], list[int]]] = []
    dropped = 0
    for messages in conversations:
        text, spans = assistant_spans(tokenizer, messages, template)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in offsets]
        # The last response's tokens: [first, end). Trailing turns after it teach nothing.
        a, b = spans[-1]
        first = next((t for t, (start, _) in enumerate(offsets) if start >= a), len(ids))
        end = max((t + 1 for t, (start, _) in enumerate(offsets) if start < b), default=0)
        if end - first + 1 > max_length:  # the response and at least one token before it
            dropped += 1
            continue
        lo = max(0, end - max_length)  # the oldest context goes first
        rows.append((ids[lo:end], mask[lo:end]))
    if dropped:
        log.warning(
            "fedlora: %s: dropped %d of %d conversations whose last response does not fit max-length %d",
            where,
            dropped,
            len(conversations),
            max_length,
        )
    if not rows:
        raise DataError(
            f"max-length: no conversation of {where} leaves room for its last response in {max_length} "
            "tokens; raise max-length"
        )
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.as_tensor(ids)
        attention[r, : len(ids)] = 1
        loss_mask[r, : len(ids)] = torch.as_tensor(mask)
    return Tokenized(input_ids, attention, None, loss_mask)
