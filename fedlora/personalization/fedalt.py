"""FedALT (Bian et al., AAAI 2026): an individual LoRA trained on, next to a frozen Rest-of-World LoRA.

Goes with the ``fedalt`` strategy. A client never restarts from an aggregate: it keeps its
individual LoRA (and task head) across rounds and, each round, trains it further for
``local-steps`` steps next to the Rest-of-World (RoW) LoRA the server sent, the mean of
the other clients' individual LoRAs, which stays frozen. Each adapted layer mixes the two
per token with a gate trained together with the individual LoRA
(`fedlora.lora.mixer`)::

    W0 x + g_row(x) s B_row A_row x + g_ind(x) s B_ind A_ind x,    g(x) = softmax(G x)

The reply uploads the individual LoRA and head only; the gates never leave the client.
The client's stored state is the individual adapter plus its gates, so both survive a
restart. The head is the individual one: a task head is not a delta a gate can weigh.

What fedlora measures: the personalized model is the mixed one; the "global" model is
the adapter in the evaluate message, i.e. this client's RoW LoRA alone (with the mean of
the others' heads). ``personal-steps`` is not used: the paper trains nothing after
aggregation. `prepare` (what ``fedlora export`` merges) has no per-input weight: it weighs
each delta by 1/2, the gate's weight for an input it cannot tell apart. ``personal-mix``
is refused (it would mix the ungated model).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from fedlora.lora.adapters import activate, adapter_state, load_adapter_state
from fedlora.lora.maths import part_of
from fedlora.lora.mixer import initial_gates, is_gate, mixed
from fedlora.models import GLOBAL, PERSONAL
from fedlora.personalization.base import Local, OwnRound, Personalization, register
from fedlora.train import evaluate
from fedlora.train.local import train_adapter

if TYPE_CHECKING:
    from fedlora.config import TrainConfig
    from fedlora.lora.adapters import AdapterState
    from fedlora.models import LoadedModel
    from fedlora.train import EvalResult, TrainResult

__all__ = ["MIXER_SEED", "FedALT", "initial_state"]

# The RoW LoRA computes as the PEFT model's shared adapter, the individual one as its personal
# adapter (last: its head is the one in use, and it is the one that trains).
ADAPTERS = (GLOBAL, PERSONAL)
MIXER_SEED = 20_260_311  # the gates' seeded start, the same on every client
_UNINFORMED = 0.5  # the weight on each delta of a model without its gates (`prepare`)


def initial_state(loaded: LoadedModel) -> AdapterState:
    """A client's state before its first round: the seeded initial adapter and seeded gates."""
    individual = OrderedDict((k, v.clone()) for k, v in loaded.initial_global.items())
    return OrderedDict({**individual, **initial_gates(loaded.model, ADAPTERS, seed=MIXER_SEED)})


def _split(stored: AdapterState) -> tuple[AdapterState, AdapterState]:
    """``(individual adapter, gates)`` of a stored state."""
    individual = OrderedDict((k, v) for k, v in stored.items() if not is_gate(k))
    gates = OrderedDict((k, v) for k, v in stored.items() if is_gate(k))
    return individual, gates


def _load(local: Local, individual: AdapterState, weight: float = 1.0) -> None:
    """Load the RoW LoRA as the shared adapter, the individual one as the personal one; B times ``weight``."""
    model = local.loaded.model

    def scaled(state: AdapterState) -> AdapterState:
        # (alpha/r) B A is linear in B: scaling B scales the delta.
        return OrderedDict((k, v * weight if part_of(k) == "lora_B" else v) for k, v in state.items())

    load_adapter_state(model, GLOBAL, scaled(local.view.global_state))
    load_adapter_state(model, PERSONAL, scaled(individual))


@register
class FedALT(Personalization):
    """Personalized = base + per-token softmax-gated mix of the individual and the RoW LoRA."""

    name = "fedalt"
    # Its prediction needs hooks that `evaluate` installs: `personal-mix` cannot mix it yet.
    mixable = False
    paper = "FedALT (Bian et al., AAAI 2026, arXiv:2503.11880)"
    summary = (
        "individual LoRA trained on across rounds next to the frozen Rest-of-World LoRA, "
        "mixed per token by a trained gate (strategy fedalt)"
    )
    keeps = (
        "a gate per adapted layer (2 x d_in), trained with its individual LoRA and head; those persist "
        "across rounds, never reset, and are what it uploads"
    )
    prediction = (
        "per token, softmax(G x)-weighted individual and RoW LoRA deltas, individual head; "
        "'global' is the RoW LoRA alone"
    )
    strategy = "fedalt"

    def train_round(self, local: Local, stored: AdapterState | None) -> OwnRound:
        """Train the individual LoRA and the gates for ``local-steps`` next to the frozen RoW LoRA."""
        individual, gates = _split(stored if stored is not None else initial_state(local.loaded))
        _load(local, individual)
        with mixed(local.loaded.model, ADAPTERS, gates, train=True) as mixer:
            result = train_adapter(
                local.loaded,
                local.train,
                list(ADAPTERS),
                local.cfg.local_steps,
                local.cfg,
                seed=local.seed,
                dp=local.dp,
                progress=local.progress,
                extra=mixer.parameters(),
            )
            gates = mixer.state()
        individual = adapter_state(local.loaded.model, PERSONAL)
        return OwnRound(sent=individual, kept=OrderedDict({**individual, **gates}), result=result)

    def update(
        self, local: Local, stored: AdapterState | None
    ) -> tuple[AdapterState | None, TrainResult | None]:
        """Nothing trains after aggregation: the state is the one the round left."""
        return (stored if stored is not None else initial_state(local.loaded)), None

    def same_as_global(self, cfg: TrainConfig) -> bool:
        """Never: the individual LoRA is trained in the federated round itself."""
        return False

    def prepare(self, local: Local, stored: AdapterState | None) -> None:
        """Both adapters, each delta weighed by 1/2, with the individual head: no gates."""
        individual, _ = _split(stored if stored is not None else initial_state(local.loaded))
        _load(local, individual, _UNINFORMED)
        activate(local.loaded.model, list(ADAPTERS), trainable=[])

    def evaluate(self, local: Local, stored: AdapterState | None) -> EvalResult:
        """Held-out metrics of the mixed model: every token with its own gate weights."""
        individual, gates = _split(stored if stored is not None else initial_state(local.loaded))
        model = local.loaded.model
        _load(local, individual)
        activate(model, list(ADAPTERS), trainable=[])
        with mixed(model, ADAPTERS, gates):
            return evaluate(model, local.test, precision=local.loaded.config.precision)
