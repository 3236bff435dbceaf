"""Everything one client message needs, resolved from the run config, the node config and state."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from functools import lru_cache
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message

from fedlora import plan
from fedlora.client.messages import Incoming
from fedlora.client.policy import DevicePolicy, PolicyRefused, RunRequest
from fedlora.client.profiles import apply_profile
from fedlora.client.state import other_records
from fedlora.config import ModelConfig, PrivacyConfig, RunConfig
from fedlora.core import keys
from fedlora.core.errors import BudgetExhausted, ConfigError, FedloraError
from fedlora.data import ClientData, load_client_data, resolve_labels
from fedlora.data.partition import hold_out
from fedlora.lora.adapters import from_record, to_record
from fedlora.lora.maths import part_of
from fedlora.lora.protocol import ClientView, receive
from fedlora.models import cached_model
from fedlora.models.device import check_compute
from fedlora.personalization import Local, get_personalization
from fedlora.privacy import PrivacyLedger, noise_multiplier
from fedlora.privacy.canary import canary_text
from fedlora.strategies.base import initial_record
from fedlora.train import Tokenized
from fedlora.train.dpsgd import DPSettings
from fedlora.train.splits import tokenize_split

if TYPE_CHECKING:
    from fedlora.lora.adapters import AdapterState

__all__ = ["Client", "sample_rows", "validation_split"]

log = logging.getLogger(__name__)


def sample_rows(rng: random.Random, n: int, at_most: int) -> list[int]:
    """All of ``range(n)`` if it fits, else a sorted seeded sample of ``at_most`` of them."""
    return list(range(n)) if n <= at_most else sorted(rng.sample(range(n), at_most))


@lru_cache(maxsize=1)
def _parse(flat: tuple[tuple[str, bool | int | float | str], ...]) -> RunConfig:
    return RunConfig.from_flat(dict(flat))


@lru_cache(maxsize=128)
def _own_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    # Per process (a Ray actor serves many simulated clients): load once.
    task, seed = cfg.model.task, cfg.federation.seed
    data = load_client_data(cfg.data, task, partition_id, num_partitions, cfg.federation.data_seed)
    privacy = cfg.privacy
    if privacy.canary_repeats and partition_id == privacy.canary_client:
        # Canary audit: a random secret, repeated, among this client's training text.
        canaries = (canary_text(seed),) * privacy.canary_repeats
        data = dataclasses.replace(data, train_texts=data.train_texts + canaries)
    return data


@lru_cache(maxsize=128)
def _client_data(
    cfg: RunConfig, model_cfg: ModelConfig, partition_id: int, num_partitions: int
) -> tuple[ClientData, Tokenized, Tokenized]:
    # Per process: tokenize once.
    task, seed = cfg.model.task, cfg.federation.seed
    data = _own_data(cfg, partition_id, num_partitions)
    tok = cached_model(model_cfg, len(resolve_labels(cfg.data, task)), seed).tokenizer
    train, test = (
        tokenize_split(tok, model_cfg, texts, labels, where=split)
        for split, texts, labels in (
            ("train", data.train_texts, data.train_labels),
            ("test", data.test_texts, data.test_labels),
        )
    )
    return data, train, test


def _validates(cfg: RunConfig) -> bool:
    """Whether clients hold out a validation split: for ``personal-mix``, or a method that uses one."""
    method = get_personalization(plan.resolved_personalization(cfg))
    return cfg.train.personal_mix != "off" or method.uses_validation


def validation_split(
    train: Tokenized, fraction: float, seed: int, partition_id: int
) -> tuple[Tokenized, Tokenized | None]:
    """``train`` less its validation split, and the split: ``max(1, round(n * fraction))`` seeded examples.

    A client with fewer than 2 training examples keeps them all and has no validation split.
    """
    if len(train) < 2:
        return train, None
    kept, held = hold_out(range(len(train)), fraction, seed * 7933 + partition_id)
    return train.subset(kept), train.subset(held)


@lru_cache(maxsize=64)
def _noise(privacy: PrivacyConfig, sample_rate: float, total_steps: int) -> float:
    # Calibrating to a target epsilon is a search over the accountant: once per client shape.
    return noise_multiplier(privacy, sample_rate, total_steps)


class Client:
    """Everything one handler call needs, resolved from the message and context."""

    def __init__(self, context: Context) -> None:
        import torch  # noqa: PLC0415 - heavy: only a client message needs it

        node = context.node_config
        cfg = _parse(tuple(sorted(context.run_config.items())))
        self.device = bool(node.get(keys.NODE_DATA_DIR))
        if self.device:
            # A deployed device reads its own folder, wherever the server's run config points.
            cfg = cfg.replace(data_dir=str(node[keys.NODE_DATA_DIR]))
        # A device owner's node config: one client per node unless told otherwise.
        self.partition_id = int(node.get(keys.NODE_PARTITION_ID, 0))
        num_partitions = int(node.get(keys.NODE_NUM_PARTITIONS, 1))
        self.info = plan.resolve(cfg).strategy
        self.protocol = self.info.protocol
        # A node's own rank (node config ``lora-rank``) wins over the run's ``client-ranks``.
        rank = int(node.get(keys.NODE_LORA_RANK, cfg.model.rank_for(self.partition_id)))
        cfg, rank = apply_profile(
            cfg, rank, str(node.get(keys.NODE_PROFILE, "")), heterogeneous=self.protocol.heterogeneous_ranks
        )
        self.cfg = cfg
        self.rank, self.num_partitions = rank, num_partitions
        self.state = context.state
        if self.device:
            # The owner's policy has the last word, before anything the run names is loaded.
            policy = DevicePolicy.from_node_config(node)
            policy.check(self._request(context, policy))
        self.data = _own_data(cfg, self.partition_id, num_partitions)
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        labels = resolve_labels(cfg.data, cfg.model.task)
        if rank != cfg.model.lora_rank and not self.protocol.heterogeneous_ranks:
            raise ConfigError(
                f"lora-rank: this node's rank {rank} differs from the run's {cfg.model.lora_rank}, "
                f"which strategy {cfg.federation.strategy!r} needs on every client"
            )
        model_cfg = dataclasses.replace(cfg.model, lora_rank=rank, client_ranks=())
        if node.get(keys.NODE_DEVICE):
            # The node knows its own hardware: its device wins over the run's.
            model_cfg = dataclasses.replace(model_cfg, device=str(node[keys.NODE_DEVICE]))
        check_compute(model_cfg)  # a device or format this node lacks: one line, before loading
        self.loaded = cached_model(model_cfg, len(labels), cfg.federation.seed)
        _, self.train, self.test = _client_data(cfg, model_cfg, self.partition_id, num_partitions)
        self.method = get_personalization(plan.resolved_personalization(cfg))
        # What the federated and the personal adapters train on, and the validation split held out of it.
        self.personal_train, self.validation = self.train, None
        if _validates(cfg):
            self.personal_train, self.validation = validation_split(
                self.train, cfg.train.validation_fraction, cfg.federation.data_seed, self.partition_id
            )

    def _request(self, context: Context, policy: DevicePolicy) -> RunRequest:
        """What this run asks of the device, for its policy: the noise it would use, the epsilon spent."""
        privacy = self.cfg.privacy
        noise = privacy.dp_noise_multiplier
        if privacy.dp_target_epsilon > 0:
            # A calibrated noise multiplier depends on this device's number of examples.
            own = _own_data(self.cfg, self.partition_id, self.num_partitions)
            noise = self._noise_and_rate(own.num_train)[0]
        here = elsewhere = 0.0
        if privacy.enabled and math.isfinite(policy.max_lifetime_epsilon):
            here = self.ledger().epsilon(privacy.dp_delta)
            try:
                records = other_records(context, keys.S_LEDGER)
            except FedloraError as err:
                log.error("fedlora client %s: %s", self.partition_id, err)
                raise PolicyRefused(
                    "policy: an earlier run's state on this device cannot be read, so its lifetime "
                    "epsilon is unknown (--max-lifetime-epsilon)"
                ) from None
            elsewhere = sum(PrivacyLedger.from_record(r).epsilon(privacy.dp_delta) for r in records)
        return RunRequest.of(self.cfg, noise_multiplier=noise, spent_here=here, spent_elsewhere=elsewhere)

    def _stored(self, name: str) -> AdapterState | None:
        record = self.state.array_records.get(name)
        return from_record(record) if record is not None else None

    def local(
        self, view: ClientView, seed: int, dp: DPSettings | None, server_round: int, *, personal: bool
    ) -> Local:
        """What a method works with in ``server_round``: this client's model, splits and view.

        ``personal``: the personal part's training examples (the validation split held out);
        otherwise the federated round's (all of them).
        """
        progress = (server_round, self.cfg.federation.num_server_rounds)
        train = self.personal_train if personal else self.train
        return Local(self.loaded, train, self.test, view, self.cfg.train, seed, dp, progress, self.validation)

    def personal(self) -> AdapterState | None:
        """The personalization method's stored state, if any."""
        return self._stored(keys.S_PERSONAL)

    def remember(self, incoming: Incoming) -> None:
        """Keep the server's latest arrays and this client's configuration, for `fedlora export`."""
        if incoming.arrays is not None:
            self.state[keys.S_LAST_GLOBAL] = incoming.arrays
        self.state[keys.S_CLIENT_CONFIG] = ConfigRecord(
            {
                **self.cfg.to_flat(),
                keys.NODE_PARTITION_ID: self.partition_id,
                keys.NODE_NUM_PARTITIONS: self.num_partitions,
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
        record = self.state.config_records.get(keys.S_PERSONAL_ROUNDS)
        return int(record["rounds"]) if record else 0  # type: ignore[arg-type]

    def keep(self, state: AdapterState) -> None:
        """Store the parts of ``state`` the strategy keeps on the client."""
        kept = {k: v for k, v in state.items() if part_of(k) in self.protocol.kept}
        if kept:
            self.state[keys.S_KEPT] = to_record(kept)

    def incoming(self, message: Message) -> Incoming:
        """The server's arrays and config in this message."""
        # A legacy message carries arrays by position, in the order of the server's first message.
        return Incoming(message, list(initial_record(self.info, self.loaded.initial_global)))

    def view(self, incoming: Incoming) -> ClientView:
        """Read the server's arrays at this client's rank, and set the base weights they imply."""
        view = receive(
            self.protocol,
            incoming.adapter(),
            self.loaded.initial_global,
            self._stored(keys.S_KEPT),
            alpha=self.cfg.model.lora_alpha,
        )
        self.loaded.set_base_delta(view.base_delta)
        return view

    def dp(self) -> DPSettings | None:
        """DP-SGD settings of this client, or None when DP is off."""
        if not self.cfg.privacy.enabled:
            return None
        privacy = self.cfg.privacy
        noise, rate = self._noise_and_rate(self.data.num_train)
        return DPSettings(noise, privacy.dp_max_grad_norm, rate, privacy.dp_secure_mode)

    def _noise_and_rate(self, num_train: int) -> tuple[float, float]:
        """The DP-SGD noise multiplier (as configured, or calibrated) and sample rate of this client."""
        rate = min(1.0, self.cfg.train.batch_size / max(1, num_train))
        total = self.cfg.federation.num_server_rounds * self.dp_steps_per_round()
        return _noise(self.cfg.privacy, rate, total), rate

    def ledger(self) -> PrivacyLedger:
        """Every DP-SGD step this client has taken in the run."""
        record = self.state.config_records.get(keys.S_LEDGER)
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
            self.state[keys.S_DECLINED] = ConfigRecord({"declined": True})
            raise BudgetExhausted(
                f"client {self.partition_id}: {steps} more DP-SGD steps would bring epsilon to "
                f"{self._epsilon_after(steps, dp):.3f}, over its budget "
                f"{self.cfg.privacy.dp_epsilon_budget:g}; it declines to train and keeps evaluating"
            )

    def declined(self) -> bool:
        """Whether this client has declined a round for its budget (it then stops training)."""
        return keys.S_DECLINED in self.state.config_records

    def spend(self, steps: int, dp: DPSettings | None) -> None:
        """Record ``steps`` DP-SGD steps in the ledger kept in the node's state."""
        if dp is None or steps <= 0:
            return
        ledger = self.ledger()
        ledger.record(steps, noise_multiplier=dp.noise_multiplier, sample_rate=dp.sample_rate)
        self.state[keys.S_LEDGER] = ledger.to_record()

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

    def held_out(self, server_round: int) -> Tokenized:
        """What ``server_round`` measures: the held-out split, or its seeded sample (``eval-examples``).

        The sample is the same every round, so that the rounds' figures compare; the last
        round measures the whole split.
        """
        fed = self.cfg.federation
        if not fed.samples_held_out(server_round) or len(self.test) <= fed.eval_examples:
            return self.test
        rng = random.Random(fed.seed * 7907 + self.partition_id)
        return self.test.subset(sample_rows(rng, len(self.test), fed.eval_examples))

    def seed(self, server_round: int, salt: int = 0) -> int:
        """A seed for this client's work in ``server_round`` (``salt`` tells the kinds of work apart)."""
        return self.cfg.federation.seed * 1_000_003 + server_round * 10_007 + self.partition_id * 101 + salt
