"""The JSONL folder layout that real clients use: ``DIR/<client>/{train,test}.jsonl``."""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

from fedlora.core.errors import DataError
from fedlora.data.chat import conversation, encode, looks_like_chat

log = logging.getLogger(__name__)

__all__ = ["SPLITS", "check_client_folder", "client_folders", "read_jsonl"]

SPLITS = ("train", "test")


def client_folders(data_dir: str | Path, *, check: bool = True) -> list[Path]:
    """Client subfolders of ``data_dir`` in sorted order (partition id ``i`` is the ``i``-th).

    A folder that itself holds ``train.jsonl`` / ``test.jsonl`` is one client (a device's own data).
    With ``check``, every folder must hold both splits; without it (a client loading only
    its own folder, which `check_client_folder` then checks) the listing costs no file
    lookups per folder, so that loading one client of thousands stays cheap.

    Raises
    ------
    DataError
        If the folder is missing, has no client subfolders, or (with ``check``) a client
        lacks a split.

    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data-dir: folder {str(root)!r} does not exist")
    if any((root / f"{split}.jsonl").is_file() for split in SPLITS):
        # A device's own folder: one client, the folder itself.
        folders = [root]
    else:
        stat = root.stat()
        folders = list(_subfolders(root, stat.st_mtime_ns, stat.st_nlink))
    if not folders:
        raise DataError(
            f"data-dir: {str(root)!r} has no client subfolders; expected "
            "DIR/<client>/train.jsonl and DIR/<client>/test.jsonl"
        )
    if check:
        for folder in folders:
            check_client_folder(folder)
    return folders


@lru_cache(maxsize=8)
def _subfolders(root: Path, mtime_ns: int, links: int) -> tuple[Path, ...]:
    # Keyed on the folder's modification time and link count, which adding or removing a
    # client folder changes.
    return tuple(sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))


def check_client_folder(folder: Path) -> None:
    """Raise `DataError` if the client folder lacks a split."""
    for split in SPLITS:
        if not (folder / f"{split}.jsonl").is_file():
            raise DataError(f"data-dir: client folder {str(folder)!r} has no {split}.jsonl")


def _label(value: object) -> str | None:
    # One label, however JSON typed it: "1", 1 and 1.0 are the same label; true is "true".
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return value
    return None


def read_jsonl(path: Path, *, task: str) -> list[dict[str, str]]:
    """Read one JSONL split; each line ``{"text": str, "label": ...}`` (label only for classification).

    Under ``task=chat`` each line is a chat record (`fedlora.data.chat`), returned as its
    conversation's canonical JSON in ``"text"``.

    Records are separated by newlines only (a U+2028 or other Unicode line separator inside
    a string is text); a UTF-8 byte-order mark and Windows line ends are accepted; blank
    lines are skipped. A record whose text is empty or only white space is dropped, and how
    many were dropped is logged. Labels are returned as strings, the same for every JSON
    type that writes them: ``"1"``, ``1`` and ``1.0`` are one label, ``true`` is ``"true"``.

    Raises
    ------
    DataError
        Naming the file and line of the first malformed record (the error's `where` names
        the file and line without the folder, for what a device may report).

    """
    records: list[dict[str, str]] = []
    try:
        content = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"data-dir: cannot read {path}: {err}", where=f"data-dir: {path.name}") from None
    empty = 0
    for number, line in enumerate(content.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path}:{number}"
        public = f"{path.name}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg})", where=public) from None
        if isinstance(record, dict) and task == "chat":
            try:
                records.append({"text": encode(conversation(record, where))})
            except DataError as err:
                raise DataError(str(err), where=public) from None
            continue
        if isinstance(record, dict) and looks_like_chat(record):
            if "text" in record:
                raise DataError(
                    f'{where}: a record holds both "text" and chat fields; a record is either '
                    '{"text": ...} or chat ({"messages": ...} or {"prompt": ..., "completion": ...})',
                    where=public,
                )
            raise DataError(
                f"{where}: a chat record (messages, or prompt and completion), but task is {task!r}: "
                "chat data needs task=chat and a causal LM",
                where=public,
            )
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{where}: expected an object with a string "text" field', where=public)
        if not record["text"].strip():
            empty += 1
            continue
        if task == "classification":
            label = _label(record.get("label"))
            if label is None:
                raise DataError(
                    f'{where}: expected a "label" field (a string, a number or true/false)', where=public
                )
            records.append({"text": record["text"], "label": label})
        else:
            records.append({"text": record["text"]})
    if empty:
        log.warning("fedlora: %s: dropped %d records with an empty text", path, empty)
    if not records:
        raise DataError(f"{path}: no records", where=f"{path.name}: no records")
    return records
