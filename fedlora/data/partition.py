"""Partitioners (IID, Dirichlet label skew, natural id), built on flwr-datasets."""

from __future__ import annotations

import random
from collections.abc import Sequence

from fedlora.core.errors import DataError

__all__ = ["PARTITIONERS", "hold_out", "partition"]

PARTITIONERS = ("iid", "dirichlet", "natural")


def hold_out(indices: Sequence[int], test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A client's share split at random into (train, test), both sorted.

    ``max(1, round(n * test_fraction))`` of the ``n`` indices, drawn with ``seed``, are the test split.
    """
    shuffled = list(indices)
    random.Random(seed).shuffle(shuffled)
    n_test = max(1, round(len(shuffled) * test_fraction))
    return sorted(shuffled[n_test:]), sorted(shuffled[:n_test])


def partition(
    labels: Sequence[int],
    num_partitions: int,
    *,
    method: str,
    alpha: float = 0.3,
    groups: Sequence[str] | None = None,
    min_size: int = 4,
    seed: int = 0,
) -> list[list[int]]:
    """Split example indices across clients.

    Parameters
    ----------
    labels : Sequence[int]
        One class index per example (``dirichlet`` skews over these).
    num_partitions : int
        Number of clients.
    method : str
        ``iid`` (uniform random), ``dirichlet`` (label skew with concentration ``alpha``,
        Hsu et al. 2019), or ``natural`` (one client per distinct value of ``groups``).
    alpha : float
        Dirichlet concentration: small values give few labels per client.
    groups : Sequence[str] or None
        Natural client id of each example (for ``natural``).
    min_size : int
        Smallest acceptable client (so that its train and test splits are not empty).
    seed : int
        Seed of the random split.

    Returns
    -------
    list[list[int]]
        ``num_partitions`` lists of example indices.

    """
    n = len(labels)
    if num_partitions <= 0:
        raise DataError(f"num-partitions: must be a positive integer, got {num_partitions}")
    if num_partitions * min_size > n:
        raise DataError(
            f"clients: {num_partitions} clients need at least {num_partitions * min_size} "
            f"examples ({min_size} each), but the data has {n}"
        )
    from datasets import Dataset  # noqa: PLC0415 - heavy: datasets
    from flwr_datasets.partitioner import (  # noqa: PLC0415 - heavy: flwr_datasets
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        Partitioner,
    )

    columns: dict[str, list] = {"index": list(range(n)), "label": list(labels)}
    partitioner: Partitioner
    if method == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        # IidPartitioner splits in order: shuffle first so that clients are random draws.

        order = list(range(n))
        random.Random(seed).shuffle(order)
        columns = {key: [values[i] for i in order] for key, values in columns.items()}
    elif method == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=True,
            seed=seed,
        )
    elif method == "natural":
        if groups is None:
            raise DataError(
                "partitioner: 'natural' needs a dataset with natural client ids "
                "(use --data DIR with one folder per client, or iid / dirichlet)"
            )
        distinct = sorted(set(groups))
        if len(distinct) < num_partitions:
            raise DataError(
                f"clients: {num_partitions} clients asked, but the data has only "
                f"{len(distinct)} natural groups"
            )
        columns["group"] = list(groups)
        partitioner = NaturalIdPartitioner(partition_by="group")
    else:
        raise DataError(f"partitioner: must be one of {', '.join(PARTITIONERS)}, got {method!r}")
    partitioner.dataset = Dataset.from_dict(columns)
    try:
        parts = [list(partitioner.load_partition(i)["index"]) for i in range(num_partitions)]
    except ValueError as err:
        raise DataError(f"partitioner: {method} could not split {n} examples: {err}") from None
    return parts
