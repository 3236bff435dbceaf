"""Clients' names in results: the name their data gives them, else their partition number.

A ``data-dir`` client is its subfolder's name; an ``hf:`` client under ``partitioner=natural``
its value of ``partition-by`` (a user, a speaker); a Shakespeare client its role
(``play/NAME``). Clients cut from a corpus by the ``iid`` or ``dirichlet`` partitioner have
no natural name: they keep their number, as a string ("0", "1", ...).
"""

from __future__ import annotations

from functools import lru_cache

from fedlora.config import DataConfig
from fedlora.core.errors import DataError
from fedlora.data.hf import hf_client_names, hf_natural_clients
from fedlora.data.jsonl import client_folders
from fedlora.data.registry import DATASETS
from fedlora.data.sources import load_corpus

__all__ = ["client_names", "natural_clients"]


@lru_cache(maxsize=8)
def client_names(cfg: DataConfig, task: str, num_partitions: int, seed: int = 0) -> tuple[str, ...]:
    """The name of each of ``num_partitions`` clients, in partition order (cached per process).

    Reads what naming needs (the folder listing, the roles, an ``hf:`` dataset's ids) and
    never a model. The names of one run are distinct.

    Parameters
    ----------
    cfg : DataConfig
        The run's data section.
    task : str
        The run's task (an ``hf:`` dataset's columns are checked for it).
    num_partitions : int
        How many clients the run has.
    seed : int
        The run's seed (an ``hf:`` dataset is loaded as its clients load it).

    Returns
    -------
    tuple[str, ...]
        Client ``i``'s name at index ``i``.

    Raises
    ------
    DataError
        If the data has fewer clients than ``num_partitions``, or cannot be read.

    """
    if num_partitions <= 0:
        raise DataError(f"num-partitions: must be a positive integer, got {num_partitions}")
    if cfg.data_dir:
        folders = client_folders(cfg.data_dir, check=False)
        if num_partitions > len(folders):
            raise DataError(
                f"clients: {num_partitions} clients asked, but data-dir {cfg.data_dir!r} "
                f"has only {len(folders)} client folders"
            )
        return tuple(folder.name for folder in folders[:num_partitions])
    if cfg.hf_dataset:
        return hf_client_names(cfg, task, num_partitions, seed)
    source = DATASETS.get(cfg.dataset)
    if source.names is None:
        return tuple(str(pid) for pid in range(num_partitions))
    names = tuple(source.names(cfg))
    if num_partitions > len(names):
        raise DataError(
            f"clients: {num_partitions} clients asked, but dataset {cfg.dataset!r} has only {len(names)}"
        )
    return names[:num_partitions]


def natural_clients(cfg: DataConfig, task: str, seed: int = 0) -> int | None:
    """How many clients the data itself defines, or None where a count must be chosen.

    A ``data-dir``: its client folders. ``partitioner=natural``: the distinct ids (an
    ``hf:`` dataset's values of ``partition-by``, a bundled corpus's natural groups).
    """
    if cfg.data_dir:
        return len(client_folders(cfg.data_dir))
    if cfg.partitioner != "natural":
        return None
    if cfg.hf_dataset:
        return hf_natural_clients(cfg, task, seed)
    groups = load_corpus(cfg.dataset).groups
    return len(set(groups)) if groups is not None else None
