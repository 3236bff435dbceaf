"""DP-SGD on the adapters: epsilon that accumulates across rounds, budgets, bad settings."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from helpers import TINY_FEDERATION, as_server, client_context
from opacus.accountants import PRVAccountant, RDPAccountant

from fedlora import plan
from fedlora.client_app import app
from fedlora.config import RunConfig
from fedlora.core import keys
from fedlora.core.errors import ConfigError
from fedlora.lora.adapters import to_record
from fedlora.models import build_model
from fedlora.privacy import PrivacyLedger, noise_multiplier
from fedlora.train import tokenize
from fedlora.train.dpsgd import DPSettings, dp_train_steps

NOISE, DELTA = 1.1, 1e-5


@pytest.fixture
def dp_cfg(tiny_cfg, jsonl_dir):
    return tiny_cfg.replace(
        data_dir=str(jsonl_dir), labels="cooking,music,sport", dp_noise_multiplier=NOISE, dp_delta=DELTA
    )


def _round(cfg, context, server_round):
    """One train and one evaluate message to this client, as a server would send them."""
    as_server()
    loaded = build_model(cfg.model, 3, seed=0)
    content = {
        keys.ARRAYS: to_record(loaded.initial_global),
        keys.CONFIG: ConfigRecord({keys.C_SERVER_ROUND: server_round}),
    }
    train = app(Message(content=RecordDict(content), dst_node_id=1, message_type="train"), context)
    evaluation = app(Message(content=RecordDict(content), dst_node_id=1, message_type="evaluate"), context)
    return train, evaluation


def test_reported_epsilon_equals_an_independent_accountant_after_several_rounds(dp_cfg):
    context = client_context(dp_cfg)
    rounds, per_round = 3, dp_cfg.train.local_steps + dp_cfg.train.personal_steps
    sample_rate = dp_cfg.train.batch_size / 16  # client-0 has 16 training records
    reported = []
    for server_round in range(1, rounds + 1):
        train, evaluation = _round(dp_cfg, context, server_round)
        assert not train.has_error() and not evaluation.has_error()
        reported.append(evaluation.content.metric_records[keys.METRICS][keys.M_EPSILON])
    independent = RDPAccountant()
    for _ in range(rounds * per_round):
        independent.step(noise_multiplier=NOISE, sample_rate=sample_rate)
    expected = independent.get_epsilon(DELTA)
    assert reported[-1] == pytest.approx(expected, rel=0.01)
    assert reported[0] < reported[1] < reported[2]  # accumulates; never restarts


def test_ledger_round_trips_and_matches_opacus_for_both_accountants():
    for name, accountant in (("rdp", RDPAccountant()), ("prv", PRVAccountant())):
        ledger = PrivacyLedger(name)
        ledger.record(10, noise_multiplier=1.0, sample_rate=0.1)
        ledger.record(5, noise_multiplier=1.0, sample_rate=0.1)
        ledger.record(4, noise_multiplier=2.0, sample_rate=0.2)
        ledger = PrivacyLedger.from_record(ledger.to_record())
        assert ledger.history == [(1.0, 0.1, 15), (2.0, 0.2, 4)] and ledger.steps == 19
        for _ in range(15):
            accountant.step(noise_multiplier=1.0, sample_rate=0.1)
        for _ in range(4):
            accountant.step(noise_multiplier=2.0, sample_rate=0.2)
        assert ledger.epsilon(DELTA) == pytest.approx(accountant.get_epsilon(DELTA), rel=0.01)
    assert PrivacyLedger().epsilon(DELTA) == 0.0


def test_a_client_stops_training_exactly_when_its_next_round_would_exceed_the_budget(dp_cfg):
    per_round = dp_cfg.train.local_steps + dp_cfg.train.personal_steps
    after = []
    for rounds in (2, 3):
        ledger = PrivacyLedger()
        ledger.record(rounds * per_round, noise_multiplier=NOISE, sample_rate=dp_cfg.train.batch_size / 16)
        after.append(ledger.epsilon(DELTA))
    budget = (after[0] + after[1]) / 2  # two rounds fit, the third does not
    cfg = dp_cfg.replace(dp_epsilon_budget=budget)
    context = client_context(cfg)
    replies = [_round(cfg, context, r) for r in (1, 2, 3, 4)]
    assert [t.has_error() for t, _ in replies] == [False, False, True, True]
    declined = replies[2][0].error
    assert declined.code == keys.E_BUDGET_EXHAUSTED
    assert "client 0:" in declined.reason and f"over its budget {budget:g}" in declined.reason
    metrics = [e.content.metric_records[keys.METRICS] for _, e in replies]
    assert [m[keys.M_BUDGET_EXHAUSTED] for m in metrics] == [0, 1, 1, 1]
    assert [m[keys.M_PERSONAL_STEPS] for m in metrics] == [dp_cfg.train.personal_steps] * 2 + [0, 0]
    assert metrics[1][keys.M_EPSILON] == pytest.approx(after[0], rel=1e-6)
    assert metrics[3][keys.M_EPSILON] == metrics[1][keys.M_EPSILON] <= budget


def test_dp_sgd_clips_and_noises_per_example_and_leaves_the_model_reusable(tiny_model):
    data = tokenize(
        tiny_model.tokenizer, [f"goal match {i}" for i in range(16)], [i % 2 for i in range(16)], 16
    )
    from fedlora.lora.adapters import activate, adapter_state
    from fedlora.models import GLOBAL

    def run(noise):
        from fedlora.lora.adapters import load_adapter_state

        load_adapter_state(tiny_model.model, GLOBAL, tiny_model.initial_global)
        activate(tiny_model.model, [GLOBAL], trainable=[GLOBAL])
        dp = DPSettings(noise_multiplier=noise, max_grad_norm=0.5, sample_rate=0.25)
        result = dp_train_steps(tiny_model.model, data, steps=4, learning_rate=1e-2, seed=0, dp=dp)
        return adapter_state(tiny_model.model, GLOBAL), result

    quiet, result = run(0.0)
    noisy, _ = run(5.0)
    again, _ = run(5.0)  # the cached model can be wrapped again: no hooks left behind
    assert result.steps == 4 and math.isfinite(result.loss)
    assert all(torch.equal(noisy[k], again[k]) for k in noisy)  # seeded
    assert any(not torch.equal(quiet[k], noisy[k]) for k in quiet)
    assert not any(
        hasattr(p, "grad_sample") and p.grad_sample is not None for p in tiny_model.model.parameters()
    )


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"dp-noise-multiplier": -1}, "dp-noise-multiplier: must be a number >= 0"),
        ({"dp-delta": 1.0}, "dp-delta: must be a number in (0, 1), got 1.0"),
        ({"dp-epsilon-budget": 0}, "dp-epsilon-budget: must be a positive number (inf: no budget), got 0.0"),
        ({"dp-accountant": "gdp"}, "dp-accountant: must be one of rdp, prv, got 'gdp'"),
        (
            {"dp-noise-multiplier": 1.0, "strategy": "fedprox"},
            "dp-noise-multiplier: DP-SGD is not yet available with strategy 'fedprox'",
        ),
        ({"client-dp": "local"}, "client-dp: must be one of off, server-clipping, client-clipping"),
        ({"client-dp-noise-multiplier": 0}, "client-dp-noise-multiplier: must be a positive number"),
        ({"client-dp-clipping-norm": -1}, "client-dp-clipping-norm: must be a positive number"),
        ({"client-dp-epsilon-budget": 0}, "client-dp-epsilon-budget: must be a positive number"),
        (
            {"client-dp": "server-clipping", "strategy": "fedadam"},
            "client-dp: client-level DP needs a strategy whose server takes the plain mean of the uploads "
            "(fedavg, fedprox, fedsa-lora, ffa-lora), got 'fedadam'",
        ),
        (
            {"secure-aggregation": True, "strategy": "krum"},
            "secure-aggregation: the server sees only the sum of the uploads, which strategy 'krum' cannot",
        ),
        (
            {"secure-aggregation": True, "client-dp": "client-clipping"},
            "client-dp: client-level DP is not yet",
        ),
        ({"secagg-clipping-range": 0}, "secagg-clipping-range: must be a positive number"),
        (
            {"dp-noise-multiplier": 1.0, "dp-secure-mode": True},
            "dp-secure-mode: needs the package torchcsprng, Opacus' cryptographically secure noise source",
        ),
    ],
)
def test_bad_privacy_settings_name_the_field(flat, message):
    with pytest.raises(ConfigError) as err:
        plan.load(flat)
    assert str(err.value).startswith(message)


def test_target_epsilon_calibrates_the_noise():
    privacy = RunConfig.from_flat({"dp-target-epsilon": 8.0}).privacy
    noise = noise_multiplier(privacy, 0.25, 30)
    ledger = PrivacyLedger()
    ledger.record(30, noise_multiplier=noise, sample_rate=0.25)
    assert privacy.enabled and 0 < noise and ledger.epsilon(privacy.dp_delta) == pytest.approx(8.0, rel=0.02)


@pytest.mark.slow
def test_a_dp_federation_completes_when_clients_run_out_of_budget(tmp_path, jsonl_dir, warm):
    from fedlora.api import run

    # Budget: one round (2 + 1 steps at q = 8/16) fits, a second does not.
    ledger = PrivacyLedger()
    ledger.record(3, noise_multiplier=NOISE, sample_rate=0.5)
    one_round = ledger.epsilon(DELTA)
    ledger.record(3, noise_multiplier=NOISE, sample_rate=0.5)
    budget = (one_round + ledger.epsilon(DELTA)) / 2
    result = run(
        **TINY_FEDERATION,
        rounds=3,
        out=tmp_path / "run",
        data=jsonl_dir,
        dp_noise_multiplier=NOISE,
        dp_epsilon_budget=budget,
    )
    rounds = result.rounds
    assert [r["clients_trained"] for r in rounds] == [3, 0, 0]
    assert [r["clients_failed"] for r in rounds] == [0, 3, 3]
    assert result.final["clients_out_of_budget"] == 3
    clients = result.summary["per_client"]["final_round"]
    assert all(c["budget_exhausted"] and c["epsilon"] <= budget for c in clients.values())
    assert result.final["epsilon_max"] == pytest.approx(one_round, rel=1e-6)
    events = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "declines to train" in events


def test_with_dp_on_a_client_still_sends_only_adapter_tensors_and_scalars(dp_cfg):
    context = client_context(dp_cfg)
    expected = list(build_model(dp_cfg.model, 3, seed=0).initial_global)
    for server_round in (1, 2):
        train, evaluation = _round(dp_cfg, context, server_round)
        assert set(train.content.array_records) == {keys.ARRAYS}
        assert list(train.content[keys.ARRAYS].keys()) == expected
        assert not evaluation.content.array_records
        for reply in (train, evaluation):
            assert not reply.content.config_records
            metrics = reply.content.metric_records[keys.METRICS]
            assert keys.M_EPSILON in metrics and keys.M_BUDGET_EXHAUSTED in metrics
            assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values())
    # The ledger is node state, not something sent.
    assert "fedlora-privacy-ledger" in context.state.config_records


def _gaussian_epsilon(noise: float, releases: int, delta: float) -> float:
    """Epsilon of ``releases`` un-subsampled Gaussian releases, from Opacus' RDP accountant."""
    accountant = RDPAccountant()
    accountant.history = [(noise, 1.0, releases)]
    return accountant.get_epsilon(delta)


@pytest.mark.slow
def test_client_level_dp_reports_server_epsilon_each_round_and_stops_at_its_budget(tmp_path, jsonl_dir, warm):
    from fedlora.api import run

    noise = 2.0
    budget = (_gaussian_epsilon(noise, 2, DELTA) + _gaussian_epsilon(noise, 3, DELTA)) / 2
    result = run(
        **TINY_FEDERATION,
        rounds=3,
        out=tmp_path / "run",
        data=jsonl_dir,
        client_dp="client-clipping",
        client_dp_noise_multiplier=noise,
        client_dp_clipping_norm=0.05,
        client_dp_epsilon_budget=budget,
        audit_examples=256,
    )
    rounds = result.rounds
    # Two releases fit the budget; the third round is not trained, and the run completes.
    assert [r["clients_trained"] for r in rounds] == [3, 3, 0]
    spent = [r["client_dp_epsilon"] for r in rounds[:2]]
    for releases, epsilon in enumerate(spent, start=1):
        assert epsilon == pytest.approx(_gaussian_epsilon(noise, releases, DELTA), rel=0.01)
    assert result.final["client_dp_epsilon"] == spent[-1] <= budget
    assert all(not math.isnan(r["personalized_accuracy"]) for r in rounds)
    # The final round's membership audit reaches the summary, per client and averaged.
    clients = result.summary["per_client"]["final_round"]
    assert all(0 <= c["mia_advantage_personalized"] <= 1 for c in clients.values())
    assert 0 <= result.final["mia_advantage_global"] <= 1
    assert "client-dp-budget-exhausted" in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_client_side_clipping_bounds_what_a_client_uploads(tiny_cfg, jsonl_dir):
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    cfg = tiny_cfg.replace(data_dir=str(jsonl_dir), labels="cooking,music,sport", client_dp="client-clipping")
    as_server()
    sent = build_model(cfg.model, 3, seed=0).initial_global
    norms = {}
    for clip in (None, 1e-3):
        config = {keys.C_SERVER_ROUND: 1, **({KEY_CLIPPING_NORM: clip} if clip else {})}
        content = RecordDict({keys.ARRAYS: to_record(sent), keys.CONFIG: ConfigRecord(config)})
        reply = app(Message(content=content, dst_node_id=1, message_type="train"), client_context(cfg))
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert reply.content.metric_records[keys.METRICS][keys.M_UNIT_WEIGHT] == 1
        uploaded = reply.content[keys.ARRAYS].to_torch_state_dict()
        norms[clip] = math.sqrt(sum(float(((uploaded[k] - v) ** 2).sum()) for k, v in sent.items()))
    assert norms[None] > 1e-2 and norms[1e-3] == pytest.approx(1e-3, rel=1e-3)


def test_client_dp_wraps_with_the_clipping_side_asked_for(tiny_cfg):
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    from fedlora.privacy.client_dp import with_client_dp
    from fedlora.strategies import build_strategy

    for mode, wrapper in (
        ("server-clipping", DifferentialPrivacyServerSideFixedClipping),
        ("client-clipping", DifferentialPrivacyClientSideFixedClipping),
    ):
        cfg = tiny_cfg.replace(client_dp=mode, fraction_train=0.5)
        wrapped = with_client_dp(build_strategy("fedavg", cfg), cfg, num_nodes=10)
        assert type(wrapped) is wrapper and wrapped.num_sampled_clients == 5
        assert wrapped.strategy.weighted_by_key == keys.M_UNIT_WEIGHT


def test_loss_threshold_advantage_by_hand():
    from fedlora.privacy.audit import loss_threshold_advantage

    # Members all below non-members: a threshold separates them perfectly.
    assert loss_threshold_advantage([0.1, 0.2], [0.5, 0.9, 1.0]) == 1.0
    # Same losses: no threshold does better than chance.
    assert loss_threshold_advantage([0.3, 0.6], [0.3, 0.6]) == 0.0
    # Threshold 0.2 catches 2/3 of members and 0/2 non-members; 0.7 catches 3/3 and 1/2.
    assert loss_threshold_advantage([0.1, 0.2, 0.7], [0.4, 0.8]) == pytest.approx(2 / 3)
    # Members with higher losses than non-members: the attack gains nothing (clamped at 0).
    assert loss_threshold_advantage([2.0, 3.0], [0.1, 0.2]) == 0.0
    assert math.isnan(loss_threshold_advantage([], [0.1]))


def test_chance_advantage_is_the_floor_without_leakage_and_shrinks_with_more_examples():
    from fedlora.privacy.audit import chance_advantage

    small, large = chance_advantage(50, 50), chance_advantage(500, 500)
    assert 0.05 < small < 0.2 and large < small / 2


def test_with_dp_personal_off_only_the_shared_steps_spend_epsilon(dp_cfg):
    cfg = dp_cfg.replace(dp_personal=False)
    context = client_context(cfg)
    metrics = [_round(cfg, context, r)[1].content.metric_records[keys.METRICS] for r in (1, 2)]
    ledger = PrivacyLedger()
    ledger.record(2 * cfg.train.local_steps, noise_multiplier=NOISE, sample_rate=cfg.train.batch_size / 16)
    assert metrics[1][keys.M_EPSILON] == pytest.approx(ledger.epsilon(DELTA), rel=1e-6)
    # The personal adapter still trains every round, without noise.
    assert [m[keys.M_PERSONAL_STEPS] for m in metrics] == [cfg.train.personal_steps] * 2


def test_canary_exposure_is_high_for_a_memorised_secret_and_about_one_for_a_typical_one():
    import numpy as np

    from fedlora.privacy.canary import SPACE, alternatives, canary_text, exposure

    rng = np.random.default_rng(0)
    losses = rng.normal(3.0, 0.2, size=1000)
    assert exposure(1.0, losses) > 0.9 * math.log2(SPACE)  # ten standard deviations below: memorised
    assert exposure(3.0, losses) == pytest.approx(1.0, abs=0.2)  # the median secret: rank |R|/2
    assert exposure(4.0, losses) < 0.01
    # The canary is never among its alternatives, and both come from the seed.
    assert canary_text(0) not in alternatives(0, 500) and canary_text(0) == canary_text(0) != canary_text(1)
    with pytest.raises(ConfigError, match="canary-repeats: the canary exposure audit needs task causal-lm"):
        RunConfig.from_flat({"canary-repeats": 5})


@pytest.mark.slow
def test_dp_lowers_canary_exposure_and_membership_advantage_of_a_causal_lm(tmp_path, warm):
    from conftest import write_client

    from fedlora.api import run

    words = {"sport": "goal match team", "music": "song band guitar", "cooking": "recipe oven salt"}
    for i, topic in enumerate(words):
        train = [{"text": f"the {words[topic]} {n} is good"} for n in range(30)]
        test = [{"text": f"the {words[topic]} x{n} is good"} for n in range(10)]
        write_client(tmp_path / "clients" / f"client-{i}", train, test)
    common = dict(
        clients=3,
        rounds=3,
        data=tmp_path / "clients",
        model="tiny-llama",
        task="causal-lm",
        max_length=16,
        local_steps=10,
        personal_steps=5,
        batch_size=8,
        learning_rate=0.01,
        local_only_baseline=False,
        canary_repeats=10,
        audit_examples=256,
    )
    plain = run(out=tmp_path / "plain", **common).final
    private = run(out=tmp_path / "dp", dp_noise_multiplier=1.0, **common).final
    # Client 0 holds the canary; without DP the personalized model ranks it far above chance.
    assert plain["canary_exposure_personalized"] > 5
    assert private["canary_exposure_personalized"] < plain["canary_exposure_personalized"] - 3
    assert private["canary_exposure_global"] < plain["canary_exposure_global"]
    assert private["mia_advantage_personalized"] < plain["mia_advantage_personalized"]


def test_wire_audit_flags_anything_but_adapter_tensors_and_scalars(tmp_path):
    import json

    from fedlora.privacy.wire import audit_wire_log

    adapter = ["base_model.model.bert.pooler.dense.lora_A.weight"]
    good = {
        "node": 1,
        "type": "train",
        "arrays": {"arrays": {adapter[0]: ["float32", [8, 32]]}},
        "metrics": {"metrics": {"num-examples": "int", "train-loss": "float"}},
        "configs": {},
    }
    leaks = [
        {**good, "arrays": {"arrays": {"bert.embeddings.word_embeddings.weight": ["float32", [1000, 32]]}}},
        {**good, "metrics": {"metrics": {"text": "str"}}},
        {**good, "configs": {"raw": {"texts": "list[3] of ['str']"}}},
    ]
    log = tmp_path / "wire.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [good, *leaks]))
    audit = audit_wire_log(log, adapter)
    assert audit.replies == 4 and not audit.clean
    assert [v.split(":")[0] for v in audit.violations] == [f"reply {n} (node 1, train)" for n in (2, 3, 4)]
    assert "is not an adapter tensor" in audit.violations[0] and "non-scalars" in audit.violations[1]
