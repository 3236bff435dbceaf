"""Shakespeare as personal chat: one client per (play, role), each example a cue and the role's reply.

Speeches are runs of one speaker's consecutive lines (`fedlora.data.shakespeare`). Each
time a role speaks right after another character, the other character's last
``CUE_LINES`` lines are the user turn (the cue) and the role's first ``REPLY_LINES``
lines the assistant turn: a personalized model should answer as that role does. As in
the text preset, the split is in time: a role's last exchanges are its test split.
"""

from __future__ import annotations

from functools import lru_cache

from fedlora.config import DataConfig
from fedlora.core.errors import DataError
from fedlora.data.chat import encode
from fedlora.data.registry import ClientData, Corpus, DataSource, register
from fedlora.data.shakespeare import Role, _play_files, parse_play, roles, split_in_time

__all__ = ["CUE_LINES", "REPLY_LINES", "chat_role_names", "chat_roles", "exchanges", "load_chat_client"]

CUE_LINES = 1  # the last lines of the speech before: the user turn
REPLY_LINES = 1  # the first lines of the role's answer: the assistant turn


@lru_cache(maxsize=64)
def _speeches(play: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A play's speeches in order: (speaker, lines), a speech being one speaker's consecutive lines."""
    speeches: list[tuple[str, list[str]]] = []
    for speaker, line in parse_play(_play_files()[play].read_text(encoding="utf-8")):
        if speeches and speeches[-1][0] == speaker:
            speeches[-1][1].append(line)
        else:
            speeches.append((speaker, [line]))
    return tuple((speaker, tuple(lines)) for speaker, lines in speeches)


def exchanges(play: str, name: str) -> tuple[tuple[str, str], ...]:
    """Every (cue, reply) of role ``name`` in ``play``, in the order spoken."""
    speeches = _speeches(play)
    return tuple(
        (" ".join(cue[-CUE_LINES:]), " ".join(reply[:REPLY_LINES]))
        for (before, cue), (speaker, reply) in zip(speeches, speeches[1:], strict=False)
        if speaker == name and before != name
    )


@lru_cache(maxsize=8)
def chat_roles(min_lines: int) -> tuple[Role, ...]:
    """The clients: roles with at least ``min_lines`` lines and two exchanges (one to hold out)."""
    return tuple(role for role in roles(min_lines) if len(exchanges(role.play, role.name)) >= 2)


def load_chat_client(cfg: DataConfig, task: str, partition_id: int, num_partitions: int) -> ClientData:
    """Client ``partition_id``: one role's exchanges as conversations, the later ones held out.

    Raises
    ------
    DataError
        On a task other than ``chat``, or more clients than roles.

    """
    if task != "chat":
        raise DataError(
            f"task: dataset 'shakespeare-chat' holds conversations and needs task=chat, got {task!r}"
        )
    clients = chat_roles(cfg.min_lines)
    if num_partitions > len(clients):
        raise DataError(
            f"clients: {num_partitions} clients asked, but shakespeare-chat has only {len(clients)} roles "
            f"with at least {cfg.min_lines} lines"
        )
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id: must be in [0, {num_partitions}), got {partition_id}")
    role = clients[partition_id]
    talks = tuple(
        encode((("user", cue), ("assistant", reply))) for cue, reply in exchanges(role.play, role.name)
    )
    return split_in_time(partition_id, talks, cfg.test_fraction)


def chat_corpus(min_lines: int = 40) -> Corpus:
    """Every exchange of every client role, in client order, with ``play/NAME`` as its group."""
    texts: list[str] = []
    groups: list[str] = []
    for role in chat_roles(min_lines):
        talks = [encode((("user", c), ("assistant", r))) for c, r in exchanges(role.play, role.name)]
        texts += talks
        groups += [role.client_id] * len(talks)
    return Corpus("shakespeare-chat", tuple(texts), (0,) * len(texts), (), tuple(groups))


def chat_role_names(cfg: DataConfig) -> tuple[str, ...]:
    """Every client's name (``play/NAME``), in partition order."""
    return tuple(role.client_id for role in chat_roles(cfg.min_lines))


register(
    DataSource("shakespeare-chat", chat_corpus, clients=load_chat_client, chat=True, names=chat_role_names)
)
