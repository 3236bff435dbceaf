"""Flower ClientApp: thin handlers that parse config, call the library and reply.

What a client sends is built only by `fedlora.adapters.to_record` (the shared adapter)
and scalar MetricRecords, filtered to the parts the strategy shares
(`fedlora.protocol.sent_parts`); personal state stays in ``context.state``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora import keys
from fedlora.config import ModelConfig, PrivacyConfig, RunConfig
from fedlora.errors import BudgetExhausted, ConfigError, FedloraError
from fedlora.node_state import node_state_mod
from fedlora.privacy.mods import privacy_mod
from fedlora.privacy.wire import wire_log_mod
from fedlora.profiles import apply_profile

if TYPE_CHECKING:
    from fedlora.adapters import AdapterState
    from fedlora.data.federated import ClientData
    from fedlora.personalization.base import Local
    from fedlora.privacy import PrivacyLedger
    from fedlora.privacy.dpsgd import DPSettings
    from fedlora.protocol import ClientView
    from fedlora.train import EvalResult, Tokenized

__all__ = ["app"]

log = logging.getLogger(__name__)
# Outermost mod: the wire log sees each reply exactly as it leaves (after SecAgg+ masking);
# then the node's state is loaded from and saved to its disk around every message.
app = ClientApp(mods=[wire_log_mod, node_state_mod])

PERSONAL_STATE = "fedlora-personal-adapter"
# Adapter parts a strategy keeps on the client between rounds (FedSA-LoRA's B).
KEPT_STATE = "fedlora-kept-parts"
# Error code of a reply that reports bad local input (config, data, model) instead of crashing.
CLIENT_INPUT_ERROR = 4100
# Error code of a training reply declined because the client's epsilon budget would be exceeded.
CLIENT_BUDGET_EXHAUSTED = 4101
_LEDGER_STATE = "fedlora-privacy-ledger"
_DECLINED_STATE = "fedlora-budget-declined"
# How many rounds the personal state has been trained: survives a restart with the state.
PERSONAL_ROUNDS_STATE = "fedlora-personal-rounds"
# What `fedlora export` rebuilds the personalized model from: the server's last arrays and
# this client's effective configuration (run config, node's data, profile and rank).
LAST_GLOBAL_STATE = "fedlora-last-global"
CLIENT_CONFIG_STATE = "fedlora-client-config"

Handler = Callable[[Message, Context], Message]


def _reply_errors(handler: Handler) -> Handler:
    """Turn a FedloraError into an error reply that names the problem, so the node lives on."""

    @functools.wraps(handler)
    def wrapped(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except FedloraError as err:
            log.error("fedlora client %s: %s", context.node_config.get("partition-id", "?"), err)
            code = CLIENT_BUDGET_EXHAUSTED if isinstance(err, BudgetExhausted) else CLIENT_INPUT_ERROR
            return Message(Error(code=code, reason=f"{type(err).__name__}: {err}"), reply_to=message)

    return wrapped


@lru_cache(maxsize=1)
def _parse(flat: tuple[tuple[str, bool | int | float | str], ...]) -> RunConfig:
    return RunConfig.from_flat(dict(flat))


@lru_cache(maxsize=128)
def _client_data(
    cfg: RunConfig, model_cfg: ModelConfig, partition_id: int, num_partitions: int
) -> tuple[ClientData, Tokenized, Tokenized]:
    # Per process (a Ray actor serves many simulated clients): load and tokenize once.
    from fedlora.data.federated import load_client_data, resolve_labels
    from fedlora.models import cached_model
    from fedlora.train import tokenize

    task, seed = cfg.model.task, cfg.federation.seed
    data = load_client_data(cfg.data, task, partition_id, num_partitions, seed)
    privacy = cfg.privacy
    if privacy.canary_repeats and partition_id == privacy.canary_client:
        # Canary audit: a random secret, repeated, among this client's training text.
        import dataclasses

        from fedlora.privacy.canary import canary_text

        canaries = (canary_text(seed),) * privacy.canary_repeats
        data = dataclasses.replace(data, train_texts=data.train_texts + canaries)
    tok = cached_model(model_cfg, len(resolve_labels(cfg.data, task)), seed).tokenizer
    classify = task == "classification"
    train = tokenize(tok, data.train_texts, data.train_labels if classify else None, cfg.model.max_length)
    test = tokenize(tok, data.test_texts, data.test_labels if classify else None, cfg.model.max_length)
    return data, train, test


@lru_cache(maxsize=64)
def _noise(privacy: PrivacyConfig, sample_rate: float, total_steps: int) -> float:
    # Calibrating to a target epsilon is a search over the accountant: once per client shape.
    return privacy.noise_for(sample_rate, total_steps)


class _Client:
    """Everything one handler call needs, resolved from the message and context."""

    def __init__(self, context: Context) -> None:
        import dataclasses

        import torch

        from fedlora.data.federated import resolve_labels
        from fedlora.models import cached_model
        from fedlora.personalization import get_personalization
        from fedlora.strategies import strategy_info

        node = context.node_config
        cfg = _parse(tuple(sorted(context.run_config.items())))
        self.device = bool(node.get("data-dir"))
        if self.device:
            # A deployed device reads its own folder, wherever the server's run config points.
            cfg = cfg.replace(data_dir=str(node["data-dir"]))
        # A device owner's node config: one client per node unless told otherwise.
        self.partition_id = int(node.get("partition-id", 0))
        num_partitions = int(node.get("num-partitions", 1))
        self.info = strategy_info(cfg.federation.strategy)
        self.protocol = self.info.protocol
        # A node's own rank (node config ``lora-rank``) wins over the run's ``client-ranks``.
        rank = int(node.get("lora-rank", cfg.model.rank_for(self.partition_id)))
        cfg, rank = apply_profile(
            cfg, rank, str(node.get("profile", "")), heterogeneous=self.protocol.heterogeneous_ranks
        )
        self.cfg = cfg
        self.rank, self.num_partitions = rank, num_partitions
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        labels = resolve_labels(cfg.data, cfg.model.task)
        if rank != cfg.model.lora_rank and not self.protocol.heterogeneous_ranks:
            raise ConfigError(
                f"lora-rank: this node's rank {rank} differs from the run's {cfg.model.lora_rank}, "
                f"which strategy {cfg.federation.strategy!r} needs on every client"
            )
        model_cfg = dataclasses.replace(cfg.model, lora_rank=rank, client_ranks=())
        self.loaded = cached_model(model_cfg, len(labels), cfg.federation.seed)
        self.data, self.train, self.test = _client_data(cfg, model_cfg, self.partition_id, num_partitions)
        self.method = get_personalization(cfg.federation.resolved_personalization())
        self.state = context.state

    def _stored(self, name: str) -> AdapterState | None:
        from fedlora.adapters import from_record

        record = self.state.array_records.get(name)
        return from_record(record) if record is not None else None

    def personal(self) -> AdapterState | None:
        """The personalization method's stored state, if any."""
        return self._stored(PERSONAL_STATE)

    def remember(self, incoming: _Incoming) -> None:
        """Keep the server's latest arrays and this client's configuration, for `fedlora export`."""
        if incoming.arrays is not None:
            self.state[LAST_GLOBAL_STATE] = incoming.arrays
        self.state[CLIENT_CONFIG_STATE] = ConfigRecord(
            {
                **self.cfg.to_flat(),
                "partition-id": self.partition_id,
                "num-partitions": self.num_partitions,
                "client-rank": self.rank,
            }
        )

    def identity(self) -> dict[str, int]:
        """The client's name in the server's results: its partition id, unless it is a device.

        Devices (a node with its own ``data-dir``) are each partition 0 of their own folder;
        the server names them by node id instead.
        """
        return {} if self.device else {keys.M_PARTITION_ID: self.partition_id}

    def personal_rounds(self) -> int:
        """Rounds in which this client's personal state was trained so far."""
        record = self.state.config_records.get(PERSONAL_ROUNDS_STATE)
        return int(record["rounds"]) if record else 0  # type: ignore[arg-type]

    def keep(self, state: AdapterState) -> None:
        """Store the parts of ``state`` the strategy keeps on the client."""
        from fedlora.adapters import to_record
        from fedlora.lora_math import part_of

        kept = {k: v for k, v in state.items() if part_of(k) in self.protocol.kept}
        if kept:
            self.state[KEPT_STATE] = to_record(kept)

    def incoming(self, message: Message) -> _Incoming:
        """The server's arrays and config in this message."""
        from fedlora.strategies.base import initial_record

        # A legacy message carries arrays by position, in the order of the server's first message.
        return _Incoming(message, list(initial_record(self.info, self.loaded.initial_global)))

    def view(self, incoming: _Incoming) -> ClientView:
        """Read the server's arrays at this client's rank, and set the base weights they imply."""
        from fedlora.protocol import receive

        view = receive(
            self.protocol,
            incoming.adapter(),
            self.loaded.initial_global,
            self._stored(KEPT_STATE),
            alpha=self.cfg.model.lora_alpha,
        )
        self.loaded.set_base_delta(view.base_delta)
        return view

    def dp(self) -> DPSettings | None:
        """DP-SGD settings of this client, or None when DP is off."""
        if not self.cfg.privacy.enabled:
            return None
        from fedlora.privacy.dpsgd import DPSettings

        train = self.cfg.train
        rate = min(1.0, train.batch_size / max(1, self.data.num_train))
        total = self.cfg.federation.num_server_rounds * self.dp_steps_per_round()
        privacy = self.cfg.privacy
        noise = _noise(privacy, rate, total)
        return DPSettings(noise, privacy.dp_max_grad_norm, rate, privacy.dp_secure_mode)

    def ledger(self) -> PrivacyLedger:
        """Every DP-SGD step this client has taken in the run."""
        from fedlora.privacy import PrivacyLedger

        record = self.state.config_records.get(_LEDGER_STATE)
        return PrivacyLedger.from_record(record) if record else PrivacyLedger(self.cfg.privacy.dp_accountant)

    def dp_steps_per_round(self) -> int:
        """DP-SGD steps in one round: the shared steps, and the personal ones unless dp-personal is off."""
        train = self.cfg.train
        return train.local_steps + (train.personal_steps if self.cfg.privacy.dp_personal else 0)

    def _epsilon_after(self, steps: int, dp: DPSettings) -> float:
        return self.ledger().epsilon_after(
            steps,
            noise_multiplier=dp.noise_multiplier,
            sample_rate=dp.sample_rate,
            delta=self.cfg.privacy.dp_delta,
        )

    def within_budget(self, steps: int, dp: DPSettings) -> bool:
        """Whether ``steps`` more DP-SGD steps keep epsilon within the budget."""
        return self._epsilon_after(steps, dp) <= self.cfg.privacy.dp_epsilon_budget

    def check_budget(self, steps: int, dp: DPSettings) -> None:
        """Refuse, with the reason, to start work whose ``steps`` would break the budget."""
        if not self.within_budget(steps, dp):
            self.state[_DECLINED_STATE] = ConfigRecord({"declined": True})
            raise BudgetExhausted(
                f"client {self.partition_id}: {steps} more DP-SGD steps would bring epsilon to "
                f"{self._epsilon_after(steps, dp):.3f}, over its budget "
                f"{self.cfg.privacy.dp_epsilon_budget:g}; it declines to train and keeps evaluating"
            )

    def declined(self) -> bool:
        """Whether this client has declined a round for its budget (it then stops training)."""
        return _DECLINED_STATE in self.state.config_records

    def spend(self, steps: int, dp: DPSettings | None) -> None:
        """Record ``steps`` DP-SGD steps in the ledger kept in the node's state."""
        if dp is None or steps <= 0:
            return
        ledger = self.ledger()
        ledger.record(steps, noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate)
        self.state[_LEDGER_STATE] = ledger.to_record()

    def privacy_metrics(self, dp: DPSettings | None) -> dict[str, float | int]:
        """Epsilon spent so far and whether a full round more would break the budget."""
        if dp is None:
            return {}
        return {
            keys.M_EPSILON: self.ledger().epsilon(self.cfg.privacy.dp_delta),
            keys.M_BUDGET_EXHAUSTED: int(not self.within_budget(self.dp_steps_per_round(), dp)),
        }

    def weight(self) -> dict[str, int]:
        """Under client-level DP every client weighs the same in the server's means."""
        return {keys.M_UNIT_WEIGHT: 1} if self.cfg.privacy.client_level else {}

    def seed(self, server_round: int, salt: int = 0) -> int:
        return self.cfg.federation.seed * 1_000_003 + server_round * 10_007 + self.partition_id * 101 + salt


# Legacy records: under secure aggregation Flower's SecAgg+ workflow sends FitIns/EvaluateIns.
_LEGACY_FIT, _LEGACY_EVALUATE = "fitins.parameters", "evaluateins.parameters"


class _Incoming:
    """The server's arrays and config, from a Message-API or a legacy (SecAgg+) message."""

    def __init__(self, message: Message, names: list[str]) -> None:
        import flwr.compat.common.recorddict_compat as compat

        content = message.content
        self.legacy = _LEGACY_FIT in content.array_records or _LEGACY_EVALUATE in content.array_records
        if self.legacy:
            from flwr.common import parameters_to_ndarrays

            ins = (
                compat.recorddict_to_fitins(content, keep_input=True)
                if _LEGACY_FIT in content.array_records
                else compat.recorddict_to_evaluateins(content, keep_input=True)
            )
            arrays = parameters_to_ndarrays(ins.parameters)
            if len(arrays) != len(names):
                raise FedloraError(f"message: {len(arrays)} arrays from the server, expected {len(names)}")
            self.arrays: ArrayRecord | None = ArrayRecord(
                {n: Array(a) for n, a in zip(names, arrays, strict=True)}
            )
            self.config: Mapping[str, object] = dict(ins.config)
            return
        self.arrays = content.array_records.get(keys.ARRAYS)
        self.config = content.config_records.get(keys.CONFIG) or {}

    def adapter(self) -> AdapterState:
        """The server's arrays, by name."""
        from fedlora.adapters import from_record

        if self.arrays is None:
            raise FedloraError(f"message: no {keys.ARRAYS!r} ArrayRecord in the server's message")
        return from_record(self.arrays)

    def int(self, key: str) -> int:
        value = self.config.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise FedloraError(f"message: config {key!r} must be an integer, got {value!r}")
        return value

    def float(self, key: str) -> float:
        value = self.config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise FedloraError(f"message: config {key!r} must be a number, got {value!r}")
        return float(value)


def _reply(
    message: Message, metrics: Mapping[str, float | int], arrays: ArrayRecord | None = None
) -> Message:
    content = RecordDict({keys.METRICS: MetricRecord(dict(metrics))})
    if arrays is not None:
        content[keys.ARRAYS] = arrays
    return Message(content=content, reply_to=message)


def _legacy_reply(
    message: Message, metrics: Mapping[str, float | int], arrays: ArrayRecord | None = None, loss: float = 0.0
) -> Message:
    """The reply SecAgg+ expects: FitRes (masked by ``secaggplus_mod`` on the way out) or EvaluateRes."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters

    ok, num = Status(Code.OK, ""), int(metrics[keys.M_NUM_EXAMPLES])
    if arrays is not None:
        params = ndarrays_to_parameters(arrays.to_numpy_ndarrays())
        content = compat.fitres_to_recorddict(FitRes(ok, params, num, dict(metrics)), keep_input=True)
    else:
        content = compat.evaluateres_to_recorddict(EvaluateRes(ok, loss, num, dict(metrics)))
    return Message(content=content, reply_to=message)


@app.train(mods=[privacy_mod])
@_reply_errors
def train(message: Message, context: Context) -> Message:
    """Train the shared adapter on local data; send back only the parts the strategy shares."""
    from fedlora.adapters import to_record
    from fedlora.personalize import train_shared
    from fedlora.protocol import sent_parts

    client = _Client(context)
    incoming = client.incoming(message)
    server_round = incoming.int(keys.C_SERVER_ROUND)
    view = client.view(incoming)
    mu = incoming.float(keys.C_PROXIMAL_MU) if client.protocol.proximal else 0.0
    dp = client.dp()
    if dp is not None:
        # A round is the shared and the personal steps: start it only if both fit in the budget.
        client.check_budget(client.dp_steps_per_round(), dp)
    state, result = train_shared(
        client.loaded,
        client.train,
        view.own_state,
        client.cfg.train,
        seed=client.seed(server_round),
        frozen=client.protocol.frozen,
        proximal_mu=mu,
        dp=dp,
    )
    client.spend(result.steps, dp)
    client.keep(state)
    metrics = {
        keys.M_NUM_EXAMPLES: client.data.num_train,
        **client.identity(),
        keys.M_TRAIN_LOSS: result.loss,
        keys.M_TRAIN_STEPS: result.steps,
        keys.M_TRAIN_WALL_S: result.wall_s,
        **client.privacy_metrics(dp),
        **client.weight(),
    }
    reply = _legacy_reply if incoming.legacy else _reply
    return reply(message, metrics, to_record(sent_parts(client.protocol, state)))


# Canary audit: how many other secrets the canary is ranked against.
CANARY_ALTERNATIVES = 1000


def _final_audit(
    client: _Client,
    local: Local,
    stored: AdapterState | None,
    global_only: EvalResult,
    personalized: EvalResult,
) -> dict[str, float]:
    """Audits of the final global and personalized models; only the scalars leave the client.

    Membership inference on every client (training examples against held-out ones), and
    the canary's exposure on the client that holds it.
    """
    import dataclasses

    from fedlora.personalize import evaluate_adapter
    from fedlora.privacy.audit import chance_advantage, loss_threshold_advantage

    def losses(data: Tokenized) -> tuple[tuple[float, ...], tuple[float, ...]]:
        on_global = evaluate_adapter(client.loaded, data, local.view.global_state)
        on_personal = client.method.evaluate(dataclasses.replace(local, test=data), stored)
        return on_global.example_losses, on_personal.example_losses

    train_global, train_personal = losses(client.train)
    audit = {
        keys.M_MIA_GLOBAL: loss_threshold_advantage(train_global, global_only.example_losses),
        keys.M_MIA_PERSONALIZED: loss_threshold_advantage(train_personal, personalized.example_losses),
        keys.M_MIA_CHANCE: chance_advantage(len(train_global), len(global_only.example_losses)),
    }
    privacy, seed = client.cfg.privacy, client.cfg.federation.seed
    if privacy.canary_repeats:
        # Flower's aggregation wants the same keys from every client: NaN where there is no canary.
        audit[keys.M_CANARY_GLOBAL] = audit[keys.M_CANARY_PERSONALIZED] = math.nan
    if privacy.canary_repeats and client.partition_id == privacy.canary_client:
        from fedlora.privacy.canary import alternatives, canary_text, exposure
        from fedlora.train import tokenize

        texts = [canary_text(seed), *alternatives(seed, CANARY_ALTERNATIVES)]
        probe = tokenize(client.loaded.tokenizer, texts, None, client.cfg.model.max_length)
        on_global, on_personal = losses(probe)
        audit[keys.M_CANARY_GLOBAL] = exposure(on_global[0], on_global[1:])
        audit[keys.M_CANARY_PERSONALIZED] = exposure(on_personal[0], on_personal[1:])
    return audit


@app.evaluate()
@_reply_errors
def evaluate(message: Message, context: Context) -> Message:
    """Update the personal state against the new global adapter, then evaluate both.

    The personalization method trains against the global adapter it will be combined
    with, so a better global adapter never leaves a stale personal one behind.
    """
    from fedlora.adapters import to_record
    from fedlora.personalization.base import Local
    from fedlora.personalize import evaluate_adapter

    client = _Client(context)
    incoming = client.incoming(message)
    server_round = incoming.int(keys.C_SERVER_ROUND)
    view = client.view(incoming)
    client.remember(incoming)
    dp = client.dp()
    seed = client.seed(server_round, 1)
    # With dp-personal off, the personal adapter (which never leaves the client) trains without DP.
    personal_dp = dp if client.cfg.privacy.dp_personal else None
    local = Local(client.loaded, client.train, client.test, view, client.cfg.train, seed, personal_dp)
    stored, result = client.personal(), None
    # A client that declined a round for its budget stops training altogether, personal
    # adapter included, and only evaluates; otherwise the personal steps complete its round.
    declined = dp is not None and client.declined()
    if not declined and (
        personal_dp is None or client.within_budget(client.cfg.train.personal_steps, personal_dp)
    ):
        stored, result = client.method.update(local, stored)
        client.spend(result.steps if result else 0, personal_dp)
    if stored is not None:
        client.state[PERSONAL_STATE] = to_record(stored)
    personal_rounds = client.personal_rounds() + (result is not None)
    client.state[PERSONAL_ROUNDS_STATE] = ConfigRecord({"rounds": personal_rounds})
    global_only = evaluate_adapter(client.loaded, client.test, view.global_state)
    personalized = client.method.evaluate(local, stored)
    final = server_round == client.cfg.federation.num_server_rounds
    audit = _final_audit(client, local, stored, global_only, personalized) if final else {}
    metrics = {
        keys.M_NUM_EXAMPLES: global_only.num_examples,
        **client.identity(),
        keys.M_ACCURACY_GLOBAL: global_only.accuracy,
        keys.M_ACCURACY_PERSONALIZED: personalized.accuracy,
        keys.M_LOSS_GLOBAL: global_only.loss,
        keys.M_LOSS_PERSONALIZED: personalized.loss,
        keys.M_PERSONAL_STEPS: result.steps if result else 0,
        keys.M_PERSONAL_LOSS: result.loss if result else 0.0,
        keys.M_PERSONAL_ROUNDS: personal_rounds,
        **client.privacy_metrics(dp),
        **client.weight(),
        **audit,
    }
    if incoming.legacy:
        return _legacy_reply(message, metrics, loss=global_only.loss)
    return _reply(message, metrics)


@app.train(keys.LOCAL_ONLY_ACTION)
@_reply_errors
def train_local_only(message: Message, context: Context) -> Message:
    """Baseline: train an adapter on this client's data alone; reply with its test accuracy only."""
    from fedlora.personalize import local_only

    client = _Client(context)
    steps = client.incoming(message).int(keys.C_LOCAL_STEPS)
    result, ev = local_only(
        client.loaded, client.train, client.test, steps, client.cfg.train, seed=client.seed(0, 7)
    )
    return _reply(
        message,
        {
            keys.M_NUM_EXAMPLES: ev.num_examples,
            **client.identity(),
            keys.M_ACCURACY_LOCAL_ONLY: ev.accuracy,
            keys.M_LOSS_LOCAL_ONLY: ev.loss,
            keys.M_TRAIN_STEPS: result.steps,
            keys.M_TRAIN_WALL_S: result.wall_s,
        },
    )
