"""The personalization interface and its registry: what a client keeps and how it predicts."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from fedlora.core.registry import Registry

if TYPE_CHECKING:
    from fedlora.config import TrainConfig
    from fedlora.lora.adapters import AdapterState
    from fedlora.lora.protocol import ClientView
    from fedlora.models import LoadedModel
    from fedlora.train import EvalResult, Tokenized, TrainResult
    from fedlora.train.dpsgd import DPSettings
from fedlora.train import evaluate

__all__ = ["PERSONALIZATIONS", "Local", "OwnRound", "Personalization", "get_personalization", "register"]


@dataclass(frozen=True)
class Local:
    """What a personalization method works with on one client in one round.

    ``view`` is the client's reading of the new global adapter; ``seed`` seeds this
    round's personal training; ``dp``, when set, makes it DP-SGD; ``progress`` places it
    in the learning-rate schedule; ``validation``, when the client holds one out, is a
    split of its training examples that ``train`` no longer contains.
    """

    loaded: LoadedModel
    train: Tokenized
    test: Tokenized
    view: ClientView
    cfg: TrainConfig
    seed: int
    dp: DPSettings | None = None
    progress: tuple[int, int] = (1, 1)  # (server round, rounds): where the LR schedule is
    # Held out of ``train`` (``validation-fraction``) when the method or ``personal-mix`` uses it.
    validation: Tokenized | None = None


@dataclass(frozen=True)
class OwnRound:
    """A federated round that a method trained its own way (`Personalization.train_round`).

    ``sent`` is the adapter the reply uploads (the strategy's protocol picks its parts);
    ``kept`` is the client's stored state after the round, which never leaves it.
    """

    sent: AdapterState
    kept: AdapterState
    result: TrainResult


class Personalization(ABC):
    """A personalization method: run on every client after each round's aggregation.

    `update` trains whatever the client keeps (the stored state never leaves the client)
    against the new global adapter; `prepare` makes the model the personalized one (what
    `evaluate` measures and ``fedlora export`` writes). A method whose clients upload an
    adapter of their own rather than one trained from the server's arrays also trains the
    federated round (`train_round`).
    """

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # For the README's table: what the client keeps (never sent), and what it predicts with.
    keeps: ClassVar[str] = ""
    prediction: ClassVar[str] = ""
    # The personal loss adds a regulariser towards the global adapter (Ditto): its gradient
    # would bypass DP-SGD's per-example clipping, so the two are not combined.
    regularized: ClassVar[bool] = False
    # A strategy this method only works with (FedSA-LoRA keeps the B its strategy leaves out).
    strategy: ClassVar[str | None] = None
    # The method selects or fits something on the client's validation split (``Local.validation``),
    # so every client holds one out of its training examples (``validation-fraction``).
    uses_validation: ClassVar[bool] = False
    # `prepare` alone makes the model predict as the personalized one (no per-input weights or
    # hooks that only `evaluate` installs), so `personal-mix` can mix its predictions.
    mixable: ClassVar[bool] = True

    def train_round(self, local: Local, stored: AdapterState | None) -> OwnRound | None:
        """Train the federated round the method's own way, or None to train it the common way.

        The common way (`fedlora.train.local.train_shared`) trains an adapter from the
        server's arrays alone, and sends it. A method that returns an `OwnRound` instead
        trains ``local-steps`` steps (with ``local.dp`` when set) from its stored state and
        says what is sent and what is kept: FedALT trains each client's individual LoRA on
        next to the frozen adapter the server sent, and sends the individual one.
        """
        return None

    def update(
        self, local: Local, stored: AdapterState | None
    ) -> tuple[AdapterState | None, TrainResult | None]:
        """Train the client's personal state for ``personal-steps``; return it and how training went.

        The default keeps nothing and trains nothing.
        """
        return None, None

    @abstractmethod
    def prepare(self, local: Local, stored: AdapterState | None) -> None:
        """Set ``local.loaded.model`` up as this client's personalized model."""

    def same_as_global(self, cfg: TrainConfig) -> bool:
        """Whether the personalized model is the global one, so that it need not be measured twice.

        By default: when no personal step is taken (an untrained personal part adds nothing).
        """
        return cfg.personal_steps == 0

    def evaluate(self, local: Local, stored: AdapterState | None) -> EvalResult:
        """Held-out metrics of the personalized model."""
        self.prepare(local, stored)
        return evaluate(local.loaded.model, local.test, precision=local.loaded.config.precision)


PERSONALIZATIONS: Registry[type[Personalization]] = Registry("personalization")


def register(cls: type[Personalization]) -> type[Personalization]:
    """Class decorator: make a method available as ``personalization=<cls.name>``.

    Raises
    ------
    RegistryError
        If another method already has that name.

    """
    return PERSONALIZATIONS.add(cls.name, cls)


def get_personalization(name: str) -> Personalization:
    """An instance of the method registered as ``name``.

    Raises
    ------
    ConfigError
        If no method has that name.

    """
    return PERSONALIZATIONS.get(name)()
