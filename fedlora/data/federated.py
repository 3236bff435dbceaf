"""One client's train/test data, from a bundled corpus partition or its JSONL folder."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from fedlora.config import DataConfig
from fedlora.core.errors import DataError
from fedlora.data.hf import hf_labels, load_hf_client
from fedlora.data.jsonl import check_client_folder, client_folders, read_jsonl
from fedlora.data.partition import hold_out, partition
from fedlora.data.registry import DATASETS, ClientData
from fedlora.data.sources import load_corpus

__all__ = ["ClientData", "load_client_data", "resolve_labels"]


@lru_cache(maxsize=4)
def resolve_labels(cfg: DataConfig, task: str) -> tuple[str, ...]:
    """The label set of a run: given in the config, else the corpus's, else inferred from all folders."""
    if task != "classification":
        return ()
    if cfg.labels:
        return cfg.labels
    if cfg.hf_dataset:
        return hf_labels(cfg)
    if not cfg.data_dir:
        return load_corpus(cfg.dataset).label_names
    trained: set[str] = set()
    tested: dict[str, Path] = {}
    for folder in client_folders(cfg.data_dir):
        trained.update(r["label"] for r in read_jsonl(folder / "train.jsonl", task=task))
        for record in read_jsonl(folder / "test.jsonl", task=task):
            tested.setdefault(record["label"], folder / "test.jsonl")
    untrained = sorted(set(tested) - trained)
    if untrained:
        raise _untrained_label(untrained[0], tested[untrained[0]], trained)
    return tuple(sorted(trained))


def _untrained_label(label: str, path: Path, trained: set[str]) -> DataError:
    # A label no client trains on would silently become a class no model can learn.
    lines = path.read_text(encoding="utf-8-sig").split("\n")
    number = next((n for n, line in enumerate(lines, 1) if json.dumps(label) in line), 0)
    where = f"{path}:{number}" if number else str(path)
    near = [t for t in sorted(trained) if t.casefold() == label.casefold()]
    hint = f" (training has {near[0]!r}: labels are case-sensitive)" if near else ""
    return DataError(
        f"{where}: label {label!r} is in test data only, so no client can learn it{hint}; "
        "fix the label, or give every class with labels=... to keep it"
    )


@lru_cache(maxsize=1)
def _bundled_partitions(cfg: DataConfig, num_partitions: int, seed: int) -> tuple[tuple[int, ...], ...]:
    corpus = load_corpus(cfg.dataset)
    parts = partition(
        corpus.labels,
        num_partitions,
        method=cfg.partitioner,
        alpha=cfg.dirichlet_alpha,
        groups=corpus.groups,
        seed=seed,
    )
    return tuple(tuple(p) for p in parts)


def _from_folder(cfg: DataConfig, task: str, partition_id: int, num_partitions: int) -> ClientData:
    folders = client_folders(cfg.data_dir, check=False)
    if num_partitions > len(folders):
        raise DataError(
            f"clients: {num_partitions} clients asked, but data-dir {cfg.data_dir!r} "
            f"has only {len(folders)} client folders"
        )
    folder = folders[partition_id]
    check_client_folder(folder)
    labels = resolve_labels(cfg, task)
    index = {name: i for i, name in enumerate(labels)}
    splits: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {}
    for split in ("train", "test"):
        path = folder / f"{split}.jsonl"
        records = read_jsonl(path, task=task)
        texts = tuple(r["text"] for r in records)
        ids: list[int] = []
        for number, r in enumerate(records, start=1):
            if task != "classification":
                ids.append(0)
            elif r["label"] not in index:
                raise DataError(
                    f"{path}: record {number} has label {r['label']!r}, not in the label set "
                    f"({', '.join(labels)})",
                    where=f"{path.name}: record {number} (label not in the label set)",
                )
            else:
                ids.append(index[r["label"]])
        splits[split] = (texts, tuple(ids))
    return ClientData(partition_id, *splits["train"], *splits["test"], labels)


@lru_cache(maxsize=8)
def load_client_data(
    cfg: DataConfig, task: str, partition_id: int, num_partitions: int, seed: int = 0
) -> ClientData:
    """Load client ``partition_id`` of ``num_partitions`` (cached per process).

    A bundled corpus is partitioned with the configured partitioner and each client's
    share is split into train/test at random, so the test split follows the client's
    own distribution; so is a Hugging Face dataset (``hf:NAME``, `fedlora.data.hf`), by
    flwr-datasets. A JSONL folder is used as it is.

    Raises
    ------
    DataError
        On a missing folder or file, a malformed record, an unknown label, or more
        clients than the data can supply.

    """
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id: must be in [0, {num_partitions}), got {partition_id}")
    if cfg.data_dir:
        return _from_folder(cfg, task, partition_id, num_partitions)
    if cfg.hf_dataset:
        return load_hf_client(cfg, task, partition_id, num_partitions, seed)
    source = DATASETS.get(cfg.dataset)
    if source.clients is not None:
        return source.clients(cfg, task, partition_id, num_partitions)
    corpus = load_corpus(cfg.dataset)
    parts = _bundled_partitions(cfg, num_partitions, seed)
    train_idx, test_idx = hold_out(list(parts[partition_id]), cfg.test_fraction, seed + partition_id)
    return ClientData(
        partition_id,
        tuple(corpus.texts[i] for i in train_idx),
        tuple(corpus.labels[i] for i in train_idx),
        tuple(corpus.texts[i] for i in test_idx),
        tuple(corpus.labels[i] for i in test_idx),
        corpus.label_names,
    )


def validate_data(cfg: DataConfig, task: str, num_partitions: int, seed: int = 0) -> tuple[str, ...]:
    """Load every client's data once so that bad input stops before any training.

    Returns the run's label set.
    """
    labels = resolve_labels(cfg, task)
    for pid in range(num_partitions):
        load_client_data(cfg, task, pid, num_partitions, seed)
    return labels
