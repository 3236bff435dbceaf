"""fedlora's cache folder, and folders built there once, atomically, however many processes ask."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["CACHE_ENV", "build_once", "cache_dir"]

log = logging.getLogger(__name__)

# Environment variable that moves the cache (default: ~/.cache/fedlora).
CACHE_ENV = "FEDLORA_CACHE"


def cache_dir() -> Path:
    """The cache folder: ``$FEDLORA_CACHE`` if set, else ``~/.cache/fedlora`` (not created here)."""
    configured = os.environ.get(CACHE_ENV, "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fedlora"


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``lock_path``; yields whether locking is available."""
    # Where flock is missing (Windows) two processes may both build; the rename below
    # still lets only a complete copy appear, and the loser's copy is discarded.
    try:
        import fcntl  # noqa: PLC0415 - optional: POSIX only
    except ImportError:
        yield False
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return the folder ``target``, first building it with ``build(tmp)`` if it does not exist.

    ``build`` writes into a fresh temporary folder beside ``target``, which is then renamed
    to ``target``: a reader never sees half a folder, a failed build leaves nothing behind,
    and concurrent callers (Ray actors, several SuperNodes on one machine) wait on a lock
    file so that only one of them builds.

    Parameters
    ----------
    target : Path
        The folder to return; its parent is created if needed.
    build : Callable[[Path], None]
        Writes the folder's contents into the (empty) folder it is given.

    Returns
    -------
    Path
        ``target``, complete.

    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}.lock") as locked:
        if target.is_dir():  # another process built it while this one waited
            return target
        if locked:
            # Under the lock, a temporary folder left here is from a process killed mid-build.
            for stale in target.parent.glob(f".{target.name}.*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            build(tmp)
            os.rename(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not target.is_dir():
                raise
            log.info("%s was built by another process meanwhile; using that copy", target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
