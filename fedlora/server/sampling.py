"""Which clients a round samples: reproducible across a resume."""

from __future__ import annotations

import random

__all__ = ["seed_sampling"]


def seed_sampling(seed: int, server_round: int) -> None:
    """Seed Flower's sampling for ``server_round`` (the run's round, not Flower's count).

    Flower samples nodes with the global `random` module: seeding it per round makes a
    resumed run sample the same clients as an uninterrupted one.
    """
    random.seed(seed * 1_000_003 + server_round)
