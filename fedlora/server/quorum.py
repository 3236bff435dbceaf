"""The reply quorum: a round changes the global adapter only if enough sampled clients answered."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Quorum"]


@dataclass(frozen=True)
class Quorum:
    """At least ``min_reply_fraction`` of the sampled clients must send a valid update.

    A client that did not answer within the round's timeout, sent an error or an upload
    the server rejected counts against it.
    """

    min_reply_fraction: float = 0.0

    def met(self, valid: int, sampled: int) -> bool:
        """Whether ``valid`` updates out of ``sampled`` clients are enough to aggregate."""
        return not sampled or valid >= self.min_reply_fraction * sampled
