"""Privacy audits run on the client: what an attacker holding the model could infer.

Membership inference with the loss-threshold attack (Yeom et al., CSF 2018): the attacker
guesses "member" when an example's loss is below a threshold. Its advantage is the best
``TPR - FPR`` over all thresholds, with the client's training examples as members and its
held-out examples as non-members; 0 means the model's losses tell the two sets apart no
better than chance. Only the resulting scalar leaves the client.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["chance_advantage", "loss_threshold_advantage"]


def loss_threshold_advantage(member_losses: Sequence[float], nonmember_losses: Sequence[float]) -> float:
    """Best ``TPR - FPR`` of "member if loss <= t" over every threshold ``t`` (in [0, 1]).

    With few examples the empirical maximum is biased upwards (about ``1 / sqrt(n)`` for
    ``n`` examples per side even without any leakage); compare runs on the same data.
    """
    members = np.sort(np.asarray(member_losses, dtype=np.float64))
    others = np.sort(np.asarray(nonmember_losses, dtype=np.float64))
    if members.size == 0 or others.size == 0:
        return float("nan")
    thresholds = np.concatenate([members, others])
    tpr = np.searchsorted(members, thresholds, side="right") / members.size
    fpr = np.searchsorted(others, thresholds, side="right") / others.size
    return float(max(0.0, np.max(tpr - fpr)))


def chance_advantage(members: int, nonmembers: int, trials: int = 200, seed: int = 0) -> float:
    """The advantage the attack shows with no leakage at all, for these sample sizes.

    Mean of `loss_threshold_advantage` over ``trials`` draws where members and
    non-members have identically distributed losses: the level a model's advantage
    should be compared with.
    """
    if members == 0 or nonmembers == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.random((trials, members + nonmembers))
    return float(np.mean([loss_threshold_advantage(d[:members], d[members:]) for d in draws]))
