"""Every strategy's aggregation, checked against independent arithmetic on the effective weights.

"Exact" means: the weight a client computes with after receiving the new global arrays
(base weight + base delta + scale * B @ A) minus the base it trained on equals the
example-weighted mean of the clients' own ``scale * B_i @ A_i``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from helpers import metrics, reply

from fedlora.config import RunConfig
from fedlora.lora.adapters import from_record, load_adapter_state, to_record
from fedlora.lora.maths import base_deltas, compact, lora_modules, part_of, svd_factors
from fedlora.lora.protocol import receive, sent_parts
from fedlora.models import GLOBAL
from fedlora.strategies import STRATEGIES, build_strategy, strategy_info
from fedlora.strategies.base import checkpoint_state, initial_record

WEIGHTS = [1, 3, 6]
ALPHA = 16


def _cfg(strategy: str, **extra) -> RunConfig:
    return RunConfig.from_flat({"model": "tiny-bert", "strategy": strategy, "lora-alpha": ALPHA, **extra})


def _client_states(start: dict, seed: int, ranks=(8, 8, 8), frozen_a: bool = False) -> list[dict]:
    """Clients after local training: random A, B, head around ``start`` (shapes at each rank)."""
    gen = torch.Generator().manual_seed(seed)
    states = []
    for r in ranks:
        state = {}
        for k, v in start.items():
            if part_of(k) == "lora_A":
                shape = (r, v.shape[1])
                state[k] = v.clone() if frozen_a else torch.randn(shape, generator=gen) * 0.3
            elif part_of(k) == "lora_B":
                state[k] = torch.randn((v.shape[0], r), generator=gen) * 0.3
            else:
                state[k] = v + torch.randn(v.shape, generator=gen) * 0.1
        states.append(state)
    return states


def _aggregate(strategy, server_round: int, current: dict, states: list[dict], protocol) -> dict:
    # The strategy sees the arrays it sent this round, then the clients' replies.
    if hasattr(strategy, "current"):
        strategy.current = dict(current)
    replies = [
        reply(
            RecordDict(
                {
                    "arrays": to_record(sent_parts(protocol, s)),
                    "metrics": metrics(num_examples=n, partition_id=i),
                }
            ),
            node_id=i + 1,
        )
        for i, (s, n) in enumerate(zip(states, WEIGHTS, strict=True))
    ]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return from_record(arrays)


def _effective(loaded, protocol, arrays: dict) -> dict[str, np.ndarray]:
    """What a rank-8 client computes with after receiving ``arrays``: base + delta + scale * B @ A."""
    view = receive(protocol, arrays, loaded.initial_global, None, alpha=ALPHA)
    loaded.set_base_delta(view.base_delta)
    load_adapter_state(loaded.model, GLOBAL, view.global_state)
    out = {}
    for m in lora_modules(view.global_state):
        layer = loaded.model.get_submodule(m)
        out[m] = (layer.get_base_layer().weight + layer.get_delta_weight(GLOBAL)).detach().double().numpy()
    loaded.set_base_delta({})
    return out


def _client_base(loaded, current: dict) -> dict[str, np.ndarray]:
    """The frozen weights the clients trained on: pretrained + the current base delta."""
    deltas = base_deltas(current)
    return {
        m: (w.double() + deltas.get(m, torch.zeros_like(w, dtype=torch.float64))).numpy()
        for m, w in loaded.base_weights.items()
    }


def _mean_update(states: list[dict]) -> dict[str, np.ndarray]:
    """Independently: sum_i n_i (alpha / r_i) B_i A_i / sum_i n_i, in NumPy float64."""
    total = sum(WEIGHTS)
    out = {}
    for m in lora_modules(states[0]):
        out[m] = sum(
            (n / total)
            * (ALPHA / s[m + ".lora_A.weight"].shape[0])
            * (s[m + ".lora_B.weight"].double().numpy() @ s[m + ".lora_A.weight"].double().numpy())
            for s, n in zip(states, WEIGHTS, strict=True)
        )
    return out


def _update_error(loaded, name: str, rounds: int = 2, ranks=(8, 8, 8)) -> float:
    cfg = _cfg(name)
    info = strategy_info(name)
    strategy = build_strategy(name, cfg)
    current = dict(initial_record(info, loaded.initial_global))
    worst = 0.0
    for server_round in range(1, rounds + 1):
        start = receive(info.protocol, current, loaded.initial_global, None, alpha=ALPHA).global_state
        states = _client_states(
            start, seed=server_round, ranks=ranks, frozen_a="lora_A" in info.protocol.frozen
        )
        new = _aggregate(strategy, server_round, current, states, info.protocol)
        base = _client_base(loaded, current)
        expected = _mean_update(states)
        effective = _effective(loaded, info.protocol, new)
        worst = max(worst, max(np.abs(effective[m] - base[m] - expected[m]).max() for m in expected))
        current = new
    return worst


@pytest.mark.parametrize("name", ["ffa-lora", "fedex-lora", "flora"])
def test_exact_strategies_apply_the_weighted_mean_of_client_updates(tiny_model, name):
    assert strategy_info(name).exact
    assert _update_error(tiny_model, name) < 1e-5


def test_flora_is_exact_with_mixed_client_ranks(tiny_model):
    assert _update_error(tiny_model, "flora", ranks=(4, 8, 16)) < 1e-5


def test_fedavg_is_not_exact(tiny_model):
    # mean(B_i) mean(A_i) != mean(B_i A_i): the error is of the order of the updates themselves.
    assert not strategy_info("fedavg").exact
    assert _update_error(tiny_model, "fedavg", rounds=1) > 1e-2


def test_flexlora_at_full_rank_is_exact_and_truncates_to_each_client_rank(tiny_model):
    # Rank 32 (= d) keeps every direction of the mean update; a rank-8 client gets the best rank-8 part.
    cfg = _cfg("flexlora", **{"client-ranks": "8,32"})
    info = strategy_info("flexlora")
    strategy = build_strategy("flexlora", cfg)
    states = _client_states(tiny_model.initial_global, seed=3, ranks=(8, 8, 8))
    new = _aggregate(strategy, 1, {}, states, info.protocol)
    expected = _mean_update(states)
    m = lora_modules(new)[0]
    b, a = new[m + ".lora_B.weight"].double().numpy(), new[m + ".lora_A.weight"].double().numpy()
    np.testing.assert_allclose(b @ a, expected[m], atol=1e-5)
    effective = _effective(tiny_model, info.protocol, new)[m] - tiny_model.base_weights[m].double().numpy()
    u, s, vh = np.linalg.svd(expected[m])
    np.testing.assert_allclose(effective, (u[:, :8] * s[:8]) @ vh[:8], atol=1e-5)


def test_ffa_lora_sends_only_b_and_head_and_never_changes_a(tiny_model):
    info = strategy_info("ffa-lora")
    sent = initial_record(info, tiny_model.initial_global)
    assert sent and {part_of(k) for k in sent} == {"lora_B", "head"}
    view = receive(info.protocol, sent, tiny_model.initial_global, None, alpha=ALPHA)
    assert all(torch.equal(view.global_state[k], v) for k, v in tiny_model.initial_global.items())


def test_fedsa_lora_keeps_b_on_the_client(tiny_model):
    info = strategy_info("fedsa-lora")
    mine = _client_states(tiny_model.initial_global, seed=5)[0]
    assert {part_of(k) for k in sent_parts(info.protocol, mine)} == {"lora_A", "head"}
    received = sent_parts(info.protocol, _client_states(tiny_model.initial_global, seed=6)[0])
    view = receive(info.protocol, received, tiny_model.initial_global, mine, alpha=ALPHA)
    for k in tiny_model.initial_global:
        if part_of(k) == "lora_B":
            assert torch.equal(view.own_state[k], mine[k])
            assert torch.equal(view.global_state[k], tiny_model.initial_global[k])
        else:
            assert torch.equal(view.own_state[k], received[k]) and torch.equal(
                view.global_state[k], received[k]
            )


def test_flora_sends_factors_while_cheaper_then_the_dense_update():
    b, a = torch.randn(32, 4), torch.randn(4, 32)
    form, tensors = compact(b, a)
    assert form == "factors" and tensors[0] is b
    b, a = torch.randn(32, 16), torch.randn(16, 32)  # 16 * 64 = 1024 = 32 * 32: dense is no bigger
    form, tensors = compact(b, a)
    assert form == "dense"
    np.testing.assert_allclose(tensors[0].numpy(), (b.double() @ a.double()).numpy(), atol=1e-10)


def test_svd_factors_pad_beyond_the_matrix_rank():
    delta = torch.outer(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0, 1.0]))  # rank 1, (2, 3)
    b, a = svd_factors(delta, 4)
    assert b.shape == (2, 4) and a.shape == (4, 3)
    np.testing.assert_allclose((b @ a).numpy(), delta.numpy(), atol=1e-6)


def test_fedex_lora_checkpoint_carries_the_residual_for_the_base(tiny_model):
    name = "fedex-lora"
    info = strategy_info(name)
    states = _client_states(tiny_model.initial_global, seed=7)
    new = _aggregate(build_strategy(name, _cfg(name)), 1, {}, states, info.protocol)
    state, base_delta, rank = checkpoint_state(new, tiny_model.initial_global, factored=False, alpha=ALPHA)
    assert rank is None and set(state) == set(tiny_model.initial_global)
    assert set(base_delta) == set(lora_modules(tiny_model.initial_global))
    assert all(math.isfinite(float(v.abs().max())) for v in base_delta.values())


def test_every_registered_strategy_builds_and_documents_itself():
    for name, info in STRATEGIES.items():
        extra = {"client-ranks": "4,8"} if info.protocol.heterogeneous_ranks else {}
        assert build_strategy(name, _cfg(name, **extra)) is not None
        assert info.paper and info.summary, name
