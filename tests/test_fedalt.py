"""FedALT: each client's Rest-of-World LoRA, its individual LoRA and gates, and what leaves it."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from helpers import as_server, client_context, reply

from fedlora import plan
from fedlora.client_app import app
from fedlora.config import RunConfig, TrainConfig
from fedlora.core import keys
from fedlora.core.errors import PairingError
from fedlora.lora.adapters import activate, from_record, to_record
from fedlora.lora.mixer import is_gate, mixed
from fedlora.lora.protocol import ClientView
from fedlora.models import build_model
from fedlora.personalization.base import Local
from fedlora.personalization.fedalt import ADAPTERS, FedALT, initial_state
from fedlora.strategies import build_strategy
from fedlora.train import evaluate, tokenize

A, B = "m.lora_A.weight", "m.lora_B.weight"
TEXTS = [f"goal match team {i}" for i in range(12)] + [f"song band guitar {i}" for i in range(12)]
LABELS = [0] * 12 + [1] * 12


class _Grid:
    """What FedAvg's sampling asks of Flower's grid: the nodes online."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _upload(node: int, value: float, weight: int) -> Message:
    state = OrderedDict([(A, torch.full((2, 3), value)), (B, torch.full((3, 2), -value))])
    metrics = MetricRecord({keys.M_NUM_EXAMPLES: weight})
    return reply(RecordDict({keys.ARRAYS: to_record(state), keys.METRICS: metrics}), node_id=node)


def _sent(messages) -> dict[int, dict[str, torch.Tensor]]:
    return {m.metadata.dst_node_id: from_record(m.content[keys.ARRAYS]) for m in messages}


def test_each_node_is_sent_the_weighted_mean_of_the_other_nodes_uploads():
    # Prepare: three nodes upload A = 1, 2, 4 (B = -A) with weights 1, 2, 1.
    strategy = build_strategy("fedalt", RunConfig.from_flat({"strategy": "fedalt", "fraction-train": 1.0}))
    initial = OrderedDict([(A, torch.zeros(2, 3)), (B, torch.zeros(3, 2))])
    grid = _Grid([1, 2, 3])
    as_server()
    first = _sent(strategy.configure_train(1, to_record(initial), ConfigRecord(), grid))
    # Execute
    arrays, _ = strategy.aggregate_train(1, [_upload(1, 1.0, 1), _upload(2, 2.0, 2), _upload(3, 4.0, 1)])
    train = _sent(strategy.configure_train(2, arrays, ConfigRecord(), _Grid([1, 2, 3, 4])))
    evaluate_ = _sent(strategy.configure_evaluate(2, arrays, ConfigRecord(), _Grid([1, 2, 3, 4])))
    # Assert: round 1 is the initial adapter; then each node's own upload is left out.
    assert all(torch.equal(state[A], initial[A]) for state in first.values())
    expected = {1: (2 * 2 + 4) / 3, 2: (1 + 4) / 2, 3: (1 + 2 * 2) / 3, 4: (1 + 2 * 2 + 4) / 4}
    for sent in (train, evaluate_):
        assert sorted(sent) == [1, 2, 3, 4]
        for node, value in expected.items():
            torch.testing.assert_close(sent[node][A], torch.full((2, 3), value))
            torch.testing.assert_close(sent[node][B], torch.full((3, 2), -value))
    # The global arrays (saved as the run's adapter) are the mean of every node's upload.
    torch.testing.assert_close(from_record(arrays)[A], torch.full((2, 3), expected[4]))


def test_a_node_keeps_its_place_until_it_uploads_again_and_alone_it_gets_the_initial_adapter():
    flat = {"strategy": "fedalt", "fraction-train": 1.0, "min-clients": 1}
    strategy = build_strategy("fedalt", RunConfig.from_flat(flat))
    initial = OrderedDict([(A, torch.full((2, 3), 0.5)), (B, torch.zeros(3, 2))])
    as_server()
    strategy.configure_train(1, to_record(initial), ConfigRecord(), _Grid([1]))
    arrays, _ = strategy.aggregate_train(1, [_upload(1, 1.0, 3)])
    alone = _sent(strategy.configure_train(2, arrays, ConfigRecord(), _Grid([1])))[1]
    assert torch.equal(alone[A], initial[A]) and torch.equal(alone[B], initial[B])
    strategy.aggregate_train(2, [_upload(2, 3.0, 1)])  # a second node joins; node 1 did not answer
    arrays, _ = strategy.aggregate_train(3, [_upload(1, 5.0, 3)])  # node 1's new upload replaces its first
    sent = _sent(strategy.configure_train(4, arrays, ConfigRecord(), _Grid([1, 2])))
    torch.testing.assert_close(sent[1][A], torch.full((2, 3), 3.0))
    torch.testing.assert_close(sent[2][A], torch.full((2, 3), 5.0))
    torch.testing.assert_close(from_record(arrays)[A], torch.full((2, 3), (3 * 5.0 + 3.0) / 4))


def _local(loaded, row, seed=0):
    data = tokenize(loaded.tokenizer, TEXTS, LABELS, 16)
    cfg = TrainConfig(batch_size=8, learning_rate=5e-2, local_steps=4, personal_steps=0)
    return Local(loaded, data, data, ClientView(row, row), cfg, seed)


def test_the_gates_train_with_the_individual_lora_and_weigh_each_input_its_own_way(tiny_model):
    # Prepare
    local = _local(tiny_model, tiny_model.initial_global)
    start = initial_state(tiny_model)
    # Execute
    own = FedALT().train_round(local, None)
    # Assert: the gates and the individual B moved; nothing of the mixer stays in the model.
    gates = [k for k in own.kept if is_gate(k)]
    assert gates and all(not torch.equal(own.kept[k], start[k]) for k in gates)
    assert any(not torch.equal(own.kept[k], start[k]) for k in own.kept if "lora_B" in k)
    assert not [n for n, _ in tiny_model.model.named_parameters() if "mixer" in n]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny_model.model.modules())
    # Two different inputs (one batch) get different weights, each pair summing to 1.
    model = tiny_model.model
    activate(model, list(ADAPTERS), trainable=[])
    batch = local.test.batch([0, 12])
    with torch.no_grad(), mixed(model, ADAPTERS, {k: own.kept[k] for k in gates}) as mixer:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    pooled = mixer.weights["base_model.model.bert.pooler.dense"]  # (2 inputs, 2 adapters)
    torch.testing.assert_close(pooled.sum(-1), torch.ones(2))
    assert not torch.allclose(pooled[0], pooled[1])


def test_zero_gates_mix_exactly_half_of_each_delta_as_prepare_does(tiny_model):
    # The hooks' mix equals B scaled by 1/2 in the weights: softmax(0, 0) is (1/2, 1/2).
    row = OrderedDict((k, v + 0.1 if "lora_B" in k else v) for k, v in tiny_model.initial_global.items())
    local = _local(tiny_model, row)
    state = OrderedDict(
        (k, torch.zeros_like(v) if is_gate(k) else v - 0.2 if "lora_B" in k else v)
        for k, v in initial_state(tiny_model).items()
    )
    gated = FedALT().evaluate(local, state)
    FedALT().prepare(local, state)
    static = evaluate(tiny_model.model, local.test)
    assert gated.loss == pytest.approx(static.loss, rel=1e-6)
    assert gated.example_losses == pytest.approx(static.example_losses, rel=1e-5)


@pytest.fixture
def cfg(tiny_cfg, jsonl_dir):
    return tiny_cfg.replace(data_dir=str(jsonl_dir), labels="cooking,music,sport", strategy="fedalt")


def _message(kind, arrays, server_round):
    as_server()
    content = {keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.C_SERVER_ROUND: server_round})}
    return Message(content=RecordDict(content), dst_node_id=1, message_type=kind)


def _distance(a, b):
    return sum(float((a[k] - b[k]).norm()) for k in a)


def test_a_train_reply_is_the_individual_lora_alone_and_the_client_trains_on_from_it(cfg):
    loaded = build_model(cfg.model, 3, seed=0)
    context = client_context(cfg)
    row = to_record(loaded.initial_global)
    first = app(_message("train", row, 1), context)
    assert not first.has_error(), first.error
    stored = from_record(context.state[keys.S_PERSONAL])
    individual = {k: v for k, v in stored.items() if not is_gate(k)}
    sent = from_record(first.content[keys.ARRAYS])
    # Exactly the individual LoRA and head: the stored tensors, none of the gates.
    assert list(sent) == list(loaded.initial_global) == list(individual)
    assert all(torch.equal(sent[k], individual[k]) for k in sent)
    assert any(is_gate(k) for k in stored) and not any(is_gate(k) for k in sent)
    # Round 2 with a RoW LoRA far from it: the client goes on from its own LoRA, not the RoW.
    far = OrderedDict((k, v + 1.0) for k, v in loaded.initial_global.items())
    second = from_record(app(_message("train", to_record(far), 2), context).content[keys.ARRAYS])
    assert _distance(second, individual) < _distance(second, far)
    evaluation = app(_message("evaluate", to_record(far), 2), context)
    assert not evaluation.has_error() and not evaluation.content.array_records
    metrics = evaluation.content.metric_records[keys.METRICS]
    assert metrics[keys.M_ACCURACY_GLOBAL] != metrics[keys.M_ACCURACY_PERSONALIZED] or (
        metrics[keys.M_LOSS_GLOBAL] != metrics[keys.M_LOSS_PERSONALIZED]
    )


@pytest.mark.parametrize(
    "flat",
    [
        {"strategy": "fedalt", "personalization": "dual"},
        {"strategy": "fedavg", "personalization": "fedalt"},
        {"strategy": "fedalt", "secure-aggregation": True},
        {"strategy": "fedalt", "client-dp": "server-clipping", "client-dp-noise-multiplier": 0.5},
    ],
)
def test_fedalt_goes_only_with_its_own_method_and_without_secure_aggregation_or_client_dp(flat):
    with pytest.raises(PairingError):
        plan.load(flat)
    assert plan.load({"strategy": "fedalt"}).personalization_name == "fedalt"
