"""A client's epsilon ledger: an Opacus accountant whose history survives across rounds.

A fresh accountant every round would restart epsilon at zero. The ledger keeps the
accountant's whole history, ``(noise multiplier, sample rate, steps)`` triples, in the
node's state and rebuilds the accountant from it, so epsilon accumulates over the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from flwr.app import ConfigRecord
    from opacus.accountants import IAccountant

from flwr.app import ConfigRecord

from fedlora.config import DP_ACCOUNTANTS, PrivacyConfig

__all__ = ["ACCOUNTANTS", "PrivacyLedger", "noise_multiplier"]

ACCOUNTANTS = DP_ACCOUNTANTS


def noise_multiplier(privacy: PrivacyConfig, sample_rate: float, total_steps: int) -> float:
    """The noise multiplier of a client with this sample rate and number of DP-SGD steps in the run.

    ``dp-target-epsilon`` > 0: calibrated with the configured accountant so that the whole
    run spends that epsilon at ``dp-delta``; otherwise ``dp-noise-multiplier`` as given.
    """
    if privacy.dp_target_epsilon <= 0:
        return privacy.dp_noise_multiplier
    from opacus.accountants.utils import get_noise_multiplier  # noqa: PLC0415 - heavy: opacus

    return float(
        get_noise_multiplier(
            target_epsilon=privacy.dp_target_epsilon,
            target_delta=privacy.dp_delta,
            sample_rate=sample_rate,
            steps=total_steps,
            accountant=privacy.dp_accountant,
        )
    )


@dataclass
class PrivacyLedger:
    """Every DP-SGD step a client has taken, as Opacus accountants record them.

    Attributes
    ----------
    accountant : str
        ``rdp`` (Renyi DP, Mironov 2017) or ``prv`` (privacy random variables, Gopi et al. 2021).
    history : list of (noise_multiplier, sample_rate, steps)
        Runs of steps with the same noise and sampling, oldest first.

    """

    accountant: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def _accountant(self, extra: tuple[float, float, int] | None = None) -> IAccountant:
        from opacus.accountants import create_accountant  # noqa: PLC0415 - heavy: opacus

        acc = create_accountant(self.accountant)
        acc.history = [*self.history, *([extra] if extra else [])]
        return acc

    @property
    def steps(self) -> int:
        """DP-SGD steps taken so far."""
        return sum(s for _, _, s in self.history)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (0 before any step)."""
        return float(self._accountant().get_epsilon(delta)) if self.history else 0.0

    def epsilon_after(
        self, steps: int, *, noise_multiplier: float, sample_rate: float, delta: float
    ) -> float:
        """Epsilon that ``steps`` more steps would bring the total to, without recording them."""
        if steps <= 0:
            return self.epsilon(delta)
        return float(self._accountant((noise_multiplier, sample_rate, steps)).get_epsilon(delta))

    def record(self, steps: int, *, noise_multiplier: float, sample_rate: float) -> None:
        """Add ``steps`` steps taken with this noise and sampling."""
        if steps <= 0:
            return
        last = self.history[-1] if self.history else None
        if last is not None and last[0] == noise_multiplier and last[1] == sample_rate:
            self.history[-1] = (noise_multiplier, sample_rate, last[2] + steps)
        else:
            self.history.append((noise_multiplier, sample_rate, steps))

    def to_record(self) -> ConfigRecord:
        """The ledger as a ConfigRecord for ``context.state``."""
        return ConfigRecord(
            {
                "accountant": self.accountant,
                "noise": [float(n) for n, _, _ in self.history],
                "rate": [float(q) for _, q, _ in self.history],
                "steps": [int(s) for _, _, s in self.history],
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> PrivacyLedger:
        """Inverse of `to_record`."""
        noise, rate, steps = (cast("list[float]", record[k]) for k in ("noise", "rate", "steps"))
        return cls(
            str(record["accountant"]),
            [(float(n), float(q), int(s)) for n, q, s in zip(noise, rate, steps, strict=True)],
        )
