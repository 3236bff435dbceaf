"""Chat and instruction records: what a ``task=chat`` JSONL line may hold, checked and normalised.

Two formats, one per record:

- ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}``, a
  conversation of any number of turns with at least one assistant turn;
- ``{"prompt": "...", "completion": "..."}``, one user turn and the assistant's answer.

Both become a conversation (a tuple of ``(role, content)`` turns). Inside fedlora a
conversation travels as its canonical JSON text (`encode`), so that the rest of the data
path (partitioning, caching, the client's splits) treats it as one example.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from fedlora.core.errors import DataError

__all__ = ["ROLES", "Conversation", "conversation", "decode", "encode", "looks_like_chat"]

ROLES = ("system", "user", "assistant")
Conversation = tuple[tuple[str, str], ...]
_FORMATS = ("text", "messages", "prompt")


def looks_like_chat(record: Mapping[str, object]) -> bool:
    """Whether a record holds chat data (``messages``, or ``prompt`` and ``completion``)."""
    return "messages" in record or "prompt" in record or "completion" in record


def conversation(record: Mapping[str, object], where: str) -> Conversation:
    """The conversation of one chat record.

    Raises
    ------
    DataError
        Naming ``where`` (the file and line) and what is wrong: more than one format in the
        record, a turn that is not ``{"role", "content"}``, an unknown role, empty content,
        or no assistant turn.

    """
    present = [f for f in _FORMATS if f in record]
    if len(present) > 1:
        raise DataError(
            f"{where}: a record holds both {present[0]!r} and {present[1]!r}; a record is either "
            '{"messages": [...]} or {"prompt": ..., "completion": ...}'
        )
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f'{where}: "prompt" and "completion" must both be strings')
        if not completion.strip():
            raise DataError(f'{where}: "completion" is empty: there is no response to learn')
        return (("user", prompt), ("assistant", completion))
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f'{where}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}} or '
            '{"prompt": ..., "completion": ...}'
        )
    turns = []
    for number, turn in enumerate(messages, start=1):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise DataError(f'{where}: message {number} must be an object with a string "content"')
        role = turn.get("role")
        if role not in ROLES:
            accepted = ", ".join(ROLES)
            raise DataError(f"{where}: message {number} has role {role!r}; a role is one of {accepted}")
        turns.append((str(role), str(turn["content"])))
    if not any(role == "assistant" and content.strip() for role, content in turns):
        raise DataError(f"{where}: the conversation has no assistant turn: there is no response to learn")
    return tuple(turns)


def encode(turns: Sequence[tuple[str, str]]) -> str:
    """A conversation as the canonical JSON text fedlora carries it in."""
    return json.dumps([{"role": r, "content": c} for r, c in turns], ensure_ascii=False)


def decode(text: str) -> list[dict[str, str]]:
    """A conversation's messages from `encode`'s text, as ``apply_chat_template`` takes them."""
    messages: list[dict[str, str]] = json.loads(text)
    return messages
