"""Any Hugging Face dataset as a federation (``dataset=hf:NAME``), divided by flwr-datasets' partitioners.

NAME is a hub id (downloaded once into the `datasets` cache where there is network), a
local folder of data files that `datasets.load_dataset` reads (JSON Lines, CSV, Parquet,
...; file names such as ``train.jsonl`` and ``test.jsonl`` name the splits, and files with
no split in their names are the split ``train``), a folder written by
``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``, or one data file.

Every kind is loaded by one `flwr_datasets.FederatedDataset`: a hub id or a plain folder
by its name; a saved folder or a single file through the packaged builder of its format
(``arrow``, ``json``, ``csv``, ``parquet``) with its files as ``data_files``, a keyword
FederatedDataset passes on to `datasets.load_dataset`. (`datasets.load_dataset` refuses a
saved ``Dataset`` folder, and reads a saved ``DatasetDict`` folder's ``state.json`` files
as if they were its rows; the saved Arrow files themselves carry the features,
``ClassLabel`` names included.) A saved ``Dataset`` and a single file are the split ``train``.

FederatedDataset shuffles every split with the run's seed; the partitioner then divides
``hf-split`` among the clients:

- ``iid``: `IidPartitioner`, equal shares of the shuffled rows;
- ``dirichlet``: `DirichletPartitioner` over ``partition-by`` (default: the label column),
  each client's share of every value drawn from Dir(``dirichlet-alpha``) (Hsu et al. 2019,
  "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
  Classification"), redrawn while a client is too small (at most 10 draws);
- ``natural``: `NaturalIdPartitioner` over ``partition-by``, one client per distinct value
  (a user, a speaker); client ``i`` is the ``i``-th value in sorted order.

A ``hf-test-split`` is divided the same way for the clients' test data: ``natural`` by the
client's own id, ``iid`` and ``dirichlet`` by a partitioner of the same kind and seed.
Without one, each client holds out ``test-fraction`` of its share at random
(`fedlora.data.partition.hold_out`), as a bundled corpus's clients do.

Partitions are read from ``FederatedDataset.partitioners``, which loads, shuffles and
assigns the splits exactly as ``FederatedDataset.load_partition`` does, without the
telemetry event that ``load_partition`` also posts to Flower's servers (unless
``FLWR_TELEMETRY_ENABLED=0`` when flwr_datasets is first imported): loading data never
uses the network beyond `datasets` itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.config import DataConfig
from fedlora.core.errors import DataError
from fedlora.data.chat import conversation, encode
from fedlora.data.jsonl import _label
from fedlora.data.partition import PARTITIONERS, hold_out
from fedlora.data.registry import ClientData

if TYPE_CHECKING:
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner

log = logging.getLogger(__name__)

__all__ = ["hf_client_names", "hf_labels", "hf_natural_clients", "load_hf_client"]

# The packaged `datasets` builder that reads a single data file, by its suffix.
_BUILDERS = {".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_TEXT_TYPES = ("string", "large_string")


@dataclass(frozen=True)
class _Federation:
    """The loaded splits, each with its partitioner, and what the run reads from them."""

    partitioners: dict[str, Partitioner]  # hf-split (and hf-test-split) -> its partitioner
    chat: dict[str, str]  # split -> "messages" or "prompt" (task=chat), "" otherwise
    labels: tuple[str, ...]  # the label set found (classification)


def _saved_files(folder: Path) -> list[str]:
    # A save_to_disk split: its Arrow files, as its state.json lists them.
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    return [str(folder / entry["filename"]) for entry in state["_data_files"]]


def _source(name: str) -> dict[str, Any]:
    """FederatedDataset's ``dataset`` (and ``data_files``) for NAME; see the module docstring."""
    path = Path(name).expanduser()
    if path.is_file():
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(
                f"dataset: hf:{name} is a file of a kind that is not read; a data file ends in "
                f"{', '.join(sorted(_BUILDERS))} (or give the folder it is in)"
            )
        return {"dataset": builder, "data_files": {"train": str(path)}}
    try:
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
            return {"dataset": "arrow", "data_files": {s: _saved_files(path / s) for s in splits}}
        if (path / "state.json").is_file():
            return {"dataset": "arrow", "data_files": {"train": _saved_files(path)}}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"dataset: hf:{name} is not a readable save_to_disk folder ({err})") from None
    return {"dataset": str(path) if path.is_dir() else name}


def _partition_column(cfg: DataConfig, task: str) -> str:
    """The column the partitioner reads ("" for iid)."""
    if cfg.partitioner == "iid":
        return ""
    if cfg.partition_by:
        return cfg.partition_by
    if cfg.partitioner == "dirichlet" and task == "classification":
        return cfg.label_column
    raise DataError(
        f"partition-by: partitioner={cfg.partitioner} over hf:{cfg.hf_dataset} needs a column (natural: the "
        "id column; dirichlet: the column whose values are skewed); name it, or use partitioner=iid"
    )


def _partitioner(cfg: DataConfig, column: str, num_partitions: int, seed: int, min_size: int) -> Partitioner:
    from flwr_datasets.partitioner import (  # noqa: PLC0415 - heavy: flwr_datasets imports datasets
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
    )

    if cfg.partitioner == "natural":
        return NaturalIdPartitioner(partition_by=column)
    if cfg.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=column,
            alpha=cfg.dirichlet_alpha,
            min_partition_size=min_size,
            self_balancing=True,
            seed=seed,
        )
    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    raise DataError(f"partitioner: must be one of {', '.join(PARTITIONERS)}, got {cfg.partitioner!r}")


def _check_columns(cfg: DataConfig, task: str, by: str, rows: Dataset, split: str) -> str:
    """Refuse a column the run reads that ``split`` lacks; return how its chat records are read."""
    from datasets import ClassLabel, Value  # noqa: PLC0415 - heavy: datasets

    where = f"hf:{cfg.hf_dataset} split {split!r}"
    have = rows.column_names

    def require(key: str, column: str, *, text: bool = False) -> None:
        if column not in have:
            raise DataError(f"{key}: {where} has no column {column!r}; its columns: {', '.join(have)}")
        feature = rows.features[column]
        if text and not (isinstance(feature, Value) and feature.dtype in _TEXT_TYPES):
            raise DataError(f"{key}: column {column!r} of {where} holds {feature}, not text")

    kind = ""
    if task == "chat":
        if cfg.messages_column in have:
            kind = "messages"
        elif cfg.prompt_column in have and cfg.completion_column in have:
            require("prompt-column", cfg.prompt_column, text=True)
            require("completion-column", cfg.completion_column, text=True)
            kind = "prompt"
        else:
            raise DataError(
                f"messages-column: task=chat reads a column of conversations ({cfg.messages_column!r}) or "
                f"columns of prompts and completions ({cfg.prompt_column!r}, {cfg.completion_column!r}); "
                f"{where} has neither; its columns: {', '.join(have)}"
            )
    else:
        require("text-column", cfg.text_column, text=True)
    if task == "classification":
        require("label-column", cfg.label_column)
        feature = rows.features[cfg.label_column]
        if not isinstance(feature, (ClassLabel, Value)):
            raise DataError(
                f"label-column: column {cfg.label_column!r} of {where} holds {feature}; a label column "
                "holds one string, number or true/false per example"
            )
    if by:
        require("partition-by", by)
    return kind


def _label_set(cfg: DataConfig, splits: Sequence[Dataset]) -> tuple[str, ...]:
    """A ClassLabel's names, else the sorted distinct values of every split, as labels."""
    from datasets import ClassLabel  # noqa: PLC0415 - heavy: datasets

    column = cfg.label_column
    feature = splits[0].features[column]
    if isinstance(feature, ClassLabel):
        return tuple(feature.names)
    values = {value for rows in splits for value in rows.unique(column) if value is not None}
    names: list[str] = []
    for value in sorted(values):
        name = _label(value)
        if name is None:
            raise DataError(
                f"label-column: column {column!r} holds {value!r}; a label is a string or a number"
            )
        names.append(name)
    return tuple(dict.fromkeys(names))


def _first_line(err: BaseException) -> str:
    return next(iter(str(err).splitlines()), type(err).__name__)


@lru_cache(maxsize=2)
def _federation(cfg: DataConfig, task: str, num_partitions: int, seed: int) -> _Federation:
    """Load NAME's splits once per process (per partitioning), check the columns, find the labels."""
    from datasets.exceptions import DatasetsError  # noqa: PLC0415 - heavy: datasets
    from flwr_datasets import FederatedDataset  # noqa: PLC0415 - heavy: datasets, pyarrow

    name = cfg.hf_dataset
    by = _partition_column(cfg, task)
    test = cfg.hf_test_split
    # A client holding out part of its share needs 2 examples; with a test split, 1 in each.
    partitioners = {cfg.hf_split: _partitioner(cfg, by, num_partitions, seed, 1 if test else 2)}
    if test:
        partitioners[test] = _partitioner(cfg, by, num_partitions, seed, 1)
    fds = FederatedDataset(
        subset=cfg.hf_subset or None, partitioners=partitioners, shuffle=True, seed=seed, **_source(name)
    )
    try:
        loaded = fds.partitioners
    except ValueError as err:
        if "is not present in the dataset's splits" not in str(err):
            raise DataError(f"dataset: cannot load hf:{name}: {_first_line(err)}") from None
        key = "hf-split" if f"'{cfg.hf_split}'" in str(err).split(" is not present")[0] else "hf-test-split"
        raise DataError(f"{key}: hf:{name}: {_first_line(err)}") from None
    except (OSError, DatasetsError) as err:
        raise DataError(f"dataset: cannot load hf:{name}: {_first_line(err)}") from None
    chat = {split: _check_columns(cfg, task, by, p.dataset, split) for split, p in loaded.items()}
    labels = _label_set(cfg, [p.dataset for p in loaded.values()]) if task == "classification" else ()
    return _Federation(dict(loaded), chat, labels)


def hf_labels(cfg: DataConfig) -> tuple[str, ...]:
    """The label set of a classification run over ``hf:NAME``: a ClassLabel's names, else the sorted values.

    Raises
    ------
    DataError
        If the dataset cannot be loaded or lacks the text or label column.

    """
    return _federation(cfg, "classification", 1, 0).labels


def _num_partitions(partitioner: Partitioner, cfg: DataConfig, split: str, num_partitions: int) -> int:
    """How many partitions there are (natural: the ids); dirichlet draws its shares here."""
    try:
        return int(partitioner.num_partitions)
    except (ValueError, TypeError) as err:
        raise DataError(
            f"partitioner: {cfg.partitioner} could not divide split {split!r} of hf:{cfg.hf_dataset} among "
            f"{num_partitions} clients ({_first_line(err)}); use fewer clients"
            + (" or a larger dirichlet-alpha" if cfg.partitioner == "dirichlet" else "")
        ) from None


def _check_sizes(fed: _Federation, cfg: DataConfig, num_partitions: int) -> None:
    """Refuse more clients than the data can give each its examples."""
    for split, partitioner in fed.partitioners.items():
        count = _num_partitions(partitioner, cfg, split, num_partitions)
        if cfg.partitioner == "natural":
            # The test split's partitions are found by id (`_test_partition`), not counted.
            if split == cfg.hf_split and num_partitions > count:
                raise DataError(
                    f"clients: {num_partitions} clients asked, but hf:{cfg.hf_dataset} has only {count} "
                    f"distinct values of partition-by {cfg.partition_by!r} in split {split!r}"
                )
            continue
        need = 1 if cfg.hf_test_split else 2
        rows = len(partitioner.dataset)
        if rows < num_partitions * need:
            raise DataError(
                f"clients: {num_partitions} clients need at least {num_partitions * need} examples of split "
                f"{split!r} ({need} each), but hf:{cfg.hf_dataset} has {rows}"
            )


def hf_natural_clients(cfg: DataConfig, task: str, seed: int = 0) -> int:
    """How many clients ``partitioner=natural`` finds: the distinct values of ``partition-by``."""
    fed = _federation(cfg, task, 1, seed)
    return _num_partitions(fed.partitioners[cfg.hf_split], cfg, cfg.hf_split, 1)


def hf_client_names(cfg: DataConfig, task: str, num_partitions: int, seed: int = 0) -> tuple[str, ...]:
    """The clients' names, in partition order: ``natural``, each client's value of ``partition-by``.

    ``iid`` and ``dirichlet`` clients have no natural name: they are numbered ("0", "1", ...),
    and the dataset is not loaded.

    Raises
    ------
    DataError
        If the dataset cannot be loaded, lacks the column, or has fewer ids than clients.

    """
    if cfg.partitioner != "natural":
        return tuple(str(pid) for pid in range(num_partitions))
    fed = _federation(cfg, task, num_partitions, seed)
    _check_sizes(fed, cfg, num_partitions)
    ids = fed.partitioners[cfg.hf_split].partition_id_to_natural_id
    return tuple(str(ids[pid]) for pid in range(num_partitions))


def _examples(
    cfg: DataConfig,
    task: str,
    fed: _Federation,
    split: str,
    rows: Dataset,
    labels: tuple[str, ...],
    where: str,
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """One client's rows of one split as texts (chat: `encode`'s JSON) and label indices."""
    from datasets import ClassLabel  # noqa: PLC0415 - heavy: datasets

    if task == "chat":
        records: list[dict[str, object]]
        if fed.chat[split] == "messages":
            records = [{"messages": m} for m in rows[cfg.messages_column]]
        else:
            pairs = zip(rows[cfg.prompt_column], rows[cfg.completion_column], strict=True)
            records = [{"prompt": p, "completion": c} for p, c in pairs]
        texts = tuple(
            encode(conversation(r, f"{where}, example {n}")) for n, r in enumerate(records, start=1)
        )
        return texts, (0,) * len(texts)
    column = list(rows[cfg.text_column])
    keep = [i for i, text in enumerate(column) if isinstance(text, str) and text.strip()]
    if len(keep) < len(column):
        log.warning("fedlora: %s: dropped %d examples with an empty text", where, len(column) - len(keep))
    if task != "classification":
        return tuple(column[i] for i in keep), (0,) * len(keep)
    feature = rows.features[cfg.label_column]
    values = list(rows[cfg.label_column])
    index = {name: i for i, name in enumerate(labels)}
    ids: list[int] = []
    for i in keep:
        value = values[i]
        if isinstance(feature, ClassLabel):
            name = (
                feature.names[value] if isinstance(value, int) and 0 <= value < feature.num_classes else None
            )
        else:
            name = _label(value)
        if name not in index:
            shown = value if name is None else name
            raise DataError(
                f"{where}, example {i + 1}: label {shown!r} is not in the label set ({', '.join(labels)})"
            )
        ids.append(index[str(name)])
    return tuple(column[i] for i in keep), tuple(ids)


def _test_partition(fed: _Federation, cfg: DataConfig, partition_id: int) -> int:
    """The test split's partition of client ``partition_id`` (natural: the one with its id)."""
    if cfg.partitioner != "natural":
        return partition_id
    train, test = fed.partitioners[cfg.hf_split], fed.partitioners[cfg.hf_test_split]
    natural_id = train.partition_id_to_natural_id[partition_id]
    by_id = {value: pid for pid, value in test.partition_id_to_natural_id.items()}
    if natural_id not in by_id:
        raise DataError(
            f"hf-test-split: split {cfg.hf_test_split!r} of hf:{cfg.hf_dataset} has no rows with "
            f"{cfg.partition_by}={natural_id!r} (client {partition_id})"
        )
    return int(by_id[natural_id])


def load_hf_client(
    cfg: DataConfig, task: str, partition_id: int, num_partitions: int, seed: int = 0
) -> ClientData:
    """Client ``partition_id`` of ``num_partitions`` over ``dataset=hf:NAME``.

    ``classification`` reads ``text-column`` and ``label-column``, ``causal-lm``
    ``text-column``; a row whose text is empty is dropped (and logged). ``chat`` reads
    ``messages-column`` where the split has it, else ``prompt-column`` and
    ``completion-column``; every record is checked by `fedlora.data.chat.conversation`
    and carried as `fedlora.data.chat.encode`'s text, as chat JSONL records are.

    Raises
    ------
    DataError
        One line naming the key at fault: a dataset that cannot be loaded, a missing split
        or column, more clients than natural ids (saying how many there are) or than the
        rows allow, a client too small to hold out a test example, a malformed record.

    """
    fed = _federation(cfg, task, num_partitions, seed)
    _check_sizes(fed, cfg, num_partitions)
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id: must be in [0, {num_partitions}), got {partition_id}")
    labels = (cfg.labels or fed.labels) if task == "classification" else ()
    train = fed.partitioners[cfg.hf_split]
    client = f"client {partition_id}"
    if cfg.partitioner == "natural":
        client += f" ({cfg.partition_by}={train.partition_id_to_natural_id[partition_id]!r})"
    where = f"hf:{cfg.hf_dataset} split {cfg.hf_split!r}, {client}"
    texts, ids = _examples(cfg, task, fed, cfg.hf_split, train.load_partition(partition_id), labels, where)
    if not cfg.hf_test_split:
        if len(texts) < 2:
            raise DataError(
                f"clients: {client} has {len(texts)} example(s) in split {cfg.hf_split!r} of "
                f"hf:{cfg.hf_dataset}; holding out test-fraction needs at least 2 (use fewer clients, or "
                "hf-test-split)"
            )
        train_idx, test_idx = hold_out(range(len(texts)), cfg.test_fraction, seed + partition_id)
        return ClientData(
            partition_id,
            tuple(texts[i] for i in train_idx),
            tuple(ids[i] for i in train_idx),
            tuple(texts[i] for i in test_idx),
            tuple(ids[i] for i in test_idx),
            labels,
        )
    rows = fed.partitioners[cfg.hf_test_split].load_partition(_test_partition(fed, cfg, partition_id))
    test_where = f"hf:{cfg.hf_dataset} split {cfg.hf_test_split!r}, {client}"
    test_texts, test_ids = _examples(cfg, task, fed, cfg.hf_test_split, rows, labels, test_where)
    for split, found in ((cfg.hf_split, texts), (cfg.hf_test_split, test_texts)):
        if not found:
            raise DataError(f"clients: {client} has no examples in split {split!r} of hf:{cfg.hf_dataset}")
    return ClientData(partition_id, texts, ids, test_texts, test_ids, labels)
