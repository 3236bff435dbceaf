"""SecAgg+: the server's strategy gets only the aggregate, which equals the plain weighted mean."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY_FEDERATION
from safetensors.torch import load_file

from fedlora.config import RunConfig
from fedlora.privacy.secagg import SECURE_EVENT, quantization_bound
from fedlora.privacy.wire import audit_wire_log
from fedlora.strategies import STRATEGIES, build_strategy

# The Message-API strategy attribute that holds each legacy keyword argument.
_SAME_AS = {"eta": "eta", "tau": "tau", "proximal_mu": "proximal_mu", "server_momentum": "server_momentum"}


@pytest.mark.parametrize("name", [n for n, info in STRATEGIES.items() if info.sum_only])
def test_each_secure_counterpart_is_a_legacy_strategy_with_the_same_hyperparameters(name):
    import flwr.server.strategy as legacy

    from fedlora.server.secure import legacy_strategy

    cfg = RunConfig().replace(strategy=name, server_learning_rate=0.05, proximal_mu=0.3, server_momentum=0.5)
    class_name, kwargs = STRATEGIES[name].legacy(cfg)
    modern = build_strategy(name, cfg)
    assert type(modern).__name__ == class_name  # FedAvg under FedAvg, FedAdam under FedAdam, ...
    for key, attribute in _SAME_AS.items():
        if key in kwargs:
            assert kwargs[key] == pytest.approx(getattr(modern, attribute)), key
    if "server_learning_rate" in kwargs:
        assert kwargs["server_learning_rate"] == pytest.approx(modern.server_learning_rate)
    built = legacy_strategy(cfg, {"x": torch.zeros(2)})
    assert isinstance(built, getattr(legacy, class_name))


def test_strategies_without_a_secure_counterpart_are_refused_with_secure_aggregation():
    from fedlora import plan
    from fedlora.core.errors import ConfigError

    for name, info in STRATEGIES.items():
        if info.sum_only:
            continue
        with pytest.raises(ConfigError, match="secure-aggregation"):
            plan.resolve(RunConfig().replace(strategy=name, secure_aggregation=True))


def _round_adapter(out):
    return load_file(str(out / "rounds" / "round-001" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_secure_aggregate_equals_the_plain_weighted_mean_and_the_strategy_sees_only_it(
    tmp_path, jsonl_dir, capsys, warm
):
    from fedlora.api import run

    common = dict(TINY_FEDERATION, rounds=2, data=jsonl_dir)
    plain = run(out=tmp_path / "plain", audit_wire_log=str(tmp_path / "plain.wire"), **common)
    secure = run(
        out=tmp_path / "secure",
        secure_aggregation=True,
        secagg_max_weight=100.0,
        audit_wire_log=str(tmp_path / "secure.wire"),
        **common,
    )
    # Each client trains on 16 examples (tests/conftest.py).
    bound = quantization_bound([16, 16, 16], clipping_range=8.0, max_weight=100.0)

    events = [json.loads(line) for line in (tmp_path / "secure" / "metrics.jsonl").read_text().splitlines()]
    seen = [e for e in events if e["event"] == SECURE_EVENT]
    # Every round: three clients trained, and the strategy was handed one vector (the sum), never theirs.
    assert [(e["round"], e["clients"], e["distinct_uploads_seen"]) for e in seen] == [(1, 3, 1), (2, 3, 1)]

    initial = build_initial(tmp_path)
    expected, got = _round_adapter(tmp_path / "plain"), _round_adapter(tmp_path / "secure")
    assert set(expected) == set(got)
    moved = max(float((expected[k] - initial[k]).abs().max()) for k in expected)
    error = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    assert moved > 100 * bound  # the round changed the adapter well beyond the tolerance
    assert 0 < error <= bound
    assert secure.final["personalized_accuracy"] == pytest.approx(
        plain.final["personalized_accuracy"], abs=0.1
    )
    assert [r["clients_trained"] for r in secure.rounds] == [3, 3]

    # Wire audit of both runs: every reply as it left a client.
    adapter_keys = json.loads((tmp_path / "plain" / "global_adapter" / "adapter_keys.json").read_text())
    plain_wire = audit_wire_log(tmp_path / "plain.wire", adapter_keys)
    secure_wire = audit_wire_log(tmp_path / "secure.wire", adapter_keys)
    assert plain_wire.clean and secure_wire.clean, plain_wire.violations + secure_wire.violations
    assert plain_wire.array_keys == set(adapter_keys) and plain_wire.secagg_replies == 0
    # Under SecAgg+ no tensor leaves in the clear: uploads go as masked vectors in the protocol.
    assert secure_wire.array_keys == set() and secure_wire.secagg_replies == 4 * 3 * 2

    # The audit command prints the same from the run directory.
    from fedlora.cli import main

    assert main(["audit", str(tmp_path / "secure")]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "the strategy was handed 1 distinct vector(s) per round" in printed
    assert "adapter tensors in the clear: 0 keys; SecAgg+ protocol replies: 24" in printed


def build_initial(tmp_path) -> dict[str, torch.Tensor]:
    """The seeded adapter both runs started from, keyed as in the saved checkpoints."""
    from fedlora.config import RunConfig
    from fedlora.models import build_model

    flat = json.loads((tmp_path / "plain" / "config.json").read_text())
    labels = flat.pop("labels").split(",")
    cfg = RunConfig.from_flat(flat)
    return dict(build_model(cfg.model, len(labels), seed=cfg.federation.seed).initial_global)
