"""What leaves a client: every reply of every handler, over several rounds."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from helpers import as_server, client_context

import fedlora.train.loops
from fedlora.client_app import app
from fedlora.config import RunConfig
from fedlora.core import keys
from fedlora.lora.adapters import from_record, to_record
from fedlora.models import load_base


def _message(kind, content):
    as_server()
    return Message(content=RecordDict(content), dst_node_id=1, message_type=kind)


def _assert_only_scalar_metrics(reply):
    assert not reply.has_error(), reply.error
    assert set(reply.content.config_records) == set()
    assert set(reply.content.metric_records) == {keys.METRICS}
    for name, value in reply.content.metric_records[keys.METRICS].items():
        assert isinstance(value, (int, float)) and not isinstance(value, bool), name


@pytest.fixture
def cfg(tiny_cfg, jsonl_dir):
    return tiny_cfg.replace(data_dir=str(jsonl_dir), labels="cooking,music,sport")


def test_every_client_message_is_the_shared_adapter_and_scalar_metrics(cfg, tiny_model):
    from fedlora.models import build_model

    loaded = build_model(cfg.model, 3, seed=0)
    expected_keys = list(loaded.initial_global)
    base_shapes = {tuple(p.shape) for p in load_base(cfg.model, 3)[0].parameters() if p.dim() == 2}
    context = client_context(cfg)
    sent = []
    global_arrays = to_record(loaded.initial_global)
    for server_round in (1, 2, 3):
        train = app(
            _message(
                "train",
                {keys.ARRAYS: global_arrays, keys.CONFIG: ConfigRecord({keys.C_SERVER_ROUND: server_round})},
            ),
            context,
        )
        sent.append(train)
        _assert_only_scalar_metrics(train)
        assert set(train.content.array_records) == {keys.ARRAYS}
        arrays = train.content[keys.ARRAYS]
        # Exactly the shared adapter's tensors: same keys, same shapes, float32, no more.
        assert list(arrays.keys()) == expected_keys
        for key, array in arrays.items():
            value = array.numpy()
            assert value.dtype == np.float32
            assert value.shape == tuple(loaded.initial_global[key].shape)
            # LoRA factors have rank 8 on one side; no full base weight matrix is among them.
            if "lora_" in key:
                assert 8 in value.shape and value.shape not in base_shapes - {(8, 32), (32, 8)}
        global_arrays = arrays
        evaluation = app(
            _message(
                "evaluate",
                {keys.ARRAYS: global_arrays, keys.CONFIG: ConfigRecord({keys.C_SERVER_ROUND: server_round})},
            ),
            context,
        )
        sent.append(evaluation)
        _assert_only_scalar_metrics(evaluation)
        assert not evaluation.content.array_records
        # The personal adapter (trained during evaluation) stays in the node's state, and
        # none of its trained tensors equals anything that was sent.
        personal = from_record(context.state["fedlora-personal-adapter"])
        sent_values = [
            torch.from_numpy(a.numpy()) for m in sent for a in m.content.get("arrays", {}).values()
        ]
        for key, value in personal.items():
            if "lora_B" in key:
                assert not any(v.shape == value.shape and torch.equal(v, value) for v in sent_values)
    local = app(
        _message(f"train.{keys.LOCAL_ONLY_ACTION}", {keys.CONFIG: ConfigRecord({keys.C_LOCAL_STEPS: 4})}),
        context,
    )
    sent.append(local)
    _assert_only_scalar_metrics(local)
    assert not local.content.array_records
    assert len(sent) == 7
    metric_names = set().union(*(set(m.content.metric_records[keys.METRICS]) for m in sent))
    assert metric_names == {
        keys.M_NUM_EXAMPLES,
        keys.M_PARTITION_ID,
        keys.M_TRAIN_LOSS,
        keys.M_TRAIN_STEPS,
        keys.M_TRAIN_WALL_S,
        keys.M_ACCURACY_GLOBAL,
        keys.M_ACCURACY_PERSONALIZED,
        keys.M_PERSONAL_ROUNDS,
        keys.M_LOSS_GLOBAL,
        keys.M_LOSS_PERSONALIZED,
        keys.M_ACCURACY_LOCAL_ONLY,
        keys.M_LOSS_LOCAL_ONLY,
        keys.M_PERSONAL_STEPS,
        keys.M_PERSONAL_LOSS,
        keys.M_GAIN_GLOBAL,
        keys.M_GAIN_GLOBAL_SE,
        keys.M_GAIN_LOCAL_ONLY,
        keys.M_GAIN_LOCAL_ONLY_SE,
    }


def test_personal_adapter_survives_rounds_and_differs_per_client(cfg):
    from fedlora.models import build_model

    loaded = build_model(cfg.model, 3, seed=0)
    arrays = to_record(loaded.initial_global)
    contexts = [client_context(cfg, pid) for pid in (0, 1)]
    for context in contexts:
        app(
            _message("evaluate", {keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.C_SERVER_ROUND: 1})}),
            context,
        )
    first = [from_record(c.state["fedlora-personal-adapter"]) for c in contexts]
    assert any(not torch.equal(first[0][k], first[1][k]) for k in first[0])
    app(
        _message("evaluate", {keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.C_SERVER_ROUND: 2})}),
        contexts[0],
    )
    second = from_record(contexts[0].state["fedlora-personal-adapter"])
    # Trained further from where it was, not restarted: round-2 B differs from round 1's.
    assert any(not torch.equal(second[k], first[0][k]) for k in second if "lora_B" in k)


def test_a_client_with_bad_data_replies_with_the_file_and_line_and_logs_the_rest(cfg, jsonl_dir, caplog):
    (jsonl_dir / "client-0" / "train.jsonl").write_text('{"text": 3, "secret": "my diary"}\n')
    from fedlora.data.federated import load_client_data

    load_client_data.cache_clear()
    reply = app(
        _message("train", {keys.ARRAYS: to_record({}), keys.CONFIG: ConfigRecord({keys.C_SERVER_ROUND: 1})}),
        client_context(cfg),
    )
    assert reply.has_error() and reply.error.code == keys.E_CLIENT_INPUT
    # What leaves the device: the kind of error, the file's name and line; no path, no content.
    assert reply.error.reason == "DataError: train.jsonl:1"
    assert str(jsonl_dir) not in reply.error.reason
    # The device's own log has the whole message.
    assert 'client-0/train.jsonl:1: expected an object with a string "text" field' in caplog.text


def test_a_label_outside_the_label_set_is_reported_without_the_label(cfg, jsonl_dir):
    (jsonl_dir / "client-0" / "test.jsonl").write_text('{"text": "a", "label": "my-private-tag"}\n')
    from fedlora.data.federated import load_client_data

    load_client_data.cache_clear()
    reply = app(
        _message("train", {keys.ARRAYS: to_record({}), keys.CONFIG: ConfigRecord({keys.C_SERVER_ROUND: 1})}),
        client_context(cfg.replace(labels="sport,music,cooking")),
    )
    assert reply.has_error()
    assert reply.error.reason == "DataError: test.jsonl: record 1 (label not in the label set)"
    assert "my-private-tag" not in reply.error.reason


@pytest.mark.parametrize(
    ("strategy", "parts"),
    [
        ("ffa-lora", {"lora_B", "head"}),
        ("fedsa-lora", {"lora_A", "head"}),
        ("fedprox", {"lora_A", "lora_B", "head"}),
        ("flora", {"lora_A", "lora_B", "head"}),
        ("flexlora", {"lora_A", "lora_B", "head"}),
    ],
)
def test_each_strategy_uploads_only_the_parts_it_shares(cfg, strategy, parts):
    from fedlora.lora.maths import part_of
    from fedlora.models import build_model
    from fedlora.strategies import strategy_info
    from fedlora.strategies.base import initial_record

    ranks = "4,16" if strategy_info(strategy).protocol.heterogeneous_ranks else ""
    cfg = cfg.replace(strategy=strategy, client_ranks=ranks)
    loaded = build_model(cfg.model, 3, seed=0)
    context = client_context(cfg, partition_id=1)  # rank 16 where ranks differ
    config = ConfigRecord({keys.C_SERVER_ROUND: 1, keys.C_PROXIMAL_MU: 0.1})
    arrays = to_record(initial_record(strategy_info(strategy), loaded.initial_global))
    train = app(_message("train", {keys.ARRAYS: arrays, keys.CONFIG: config}), context)
    _assert_only_scalar_metrics(train)
    uploaded = from_record(train.content[keys.ARRAYS])
    assert {part_of(k) for k in uploaded} == parts
    assert [k for k in loaded.initial_global if part_of(k) in parts] == list(uploaded)
    rank = 16 if ranks else 8
    assert all(rank in v.shape for k, v in uploaded.items() if part_of(k) != "head")
    kept = context.state.array_records.get("fedlora-kept-parts")
    if strategy == "fedsa-lora":
        # B was trained, kept on the node, and is not among what was sent.
        kept_b = from_record(kept)
        assert kept_b and {part_of(k) for k in kept_b} == {"lora_B"}
        assert all(torch.count_nonzero(v) > 0 for v in kept_b.values())
        assert not any(
            torch.equal(v, u) for v in kept_b.values() for u in uploaded.values() if u.shape == v.shape
        )
    else:
        assert kept is None
    evaluation = app(_message("evaluate", {keys.ARRAYS: arrays, keys.CONFIG: config}), context)
    _assert_only_scalar_metrics(evaluation)
    assert not evaluation.content.array_records


def test_a_node_with_its_own_rank_is_refused_where_the_strategy_needs_one_rank(cfg, caplog):
    context = client_context(cfg)
    context.node_config["lora-rank"] = 4
    reply = app(
        _message("train", {keys.ARRAYS: to_record({}), keys.CONFIG: ConfigRecord({keys.C_SERVER_ROUND: 1})}),
        context,
    )
    assert reply.has_error() and reply.error.reason == "ConfigError: lora-rank"
    assert "lora-rank: this node's rank 4 differs from the run's 8, which strategy 'fedavg' needs" in (
        caplog.text
    )


@pytest.fixture
def three_labels(cfg):
    from fedlora.models import build_model

    return build_model(cfg.model, 3, seed=0)


def _evaluate(cfg, context, server_round, loaded):
    arrays = to_record(loaded.initial_global)
    config = ConfigRecord({keys.C_SERVER_ROUND: server_round})
    reply = app(_message("evaluate", {keys.ARRAYS: arrays, keys.CONFIG: config}), context)
    _assert_only_scalar_metrics(reply)
    return dict(reply.content.metric_records[keys.METRICS])


def _count_evaluations(monkeypatch) -> list[int]:
    import fedlora.personalization.base
    import fedlora.train.local

    calls: list[int] = []
    real = fedlora.train.loops.evaluate

    def counted(model, data, **kwargs):
        calls.append(len(data))
        return real(model, data, **kwargs)

    monkeypatch.setattr(fedlora.train.local, "evaluate", counted)
    monkeypatch.setattr(fedlora.personalization.base, "evaluate", counted)
    return calls


def test_rounds_between_evaluations_train_but_measure_nothing(cfg, three_labels, monkeypatch):
    cfg = cfg.replace(evaluate_every=2, num_server_rounds=3, audit_examples=256)
    context, calls = client_context(cfg), _count_evaluations(monkeypatch)
    first = _evaluate(cfg, context, 1, three_labels)
    assert keys.M_ACCURACY_GLOBAL not in first and keys.M_ACCURACY_PERSONALIZED not in first
    # Trained its personal steps, measured nothing.
    assert first[keys.M_PERSONAL_STEPS] == cfg.train.personal_steps and calls == []
    second = _evaluate(cfg, context, 2, three_labels)
    assert keys.M_ACCURACY_GLOBAL in second and keys.M_MIA_GLOBAL not in second
    assert len(calls) == 2  # global and personalized
    third = _evaluate(cfg, context, 3, three_labels)  # the last round: always, with the audit
    assert keys.M_ACCURACY_GLOBAL in third and keys.M_MIA_GLOBAL in third


def test_a_personalized_model_that_is_the_global_one_is_measured_once(cfg, three_labels, monkeypatch):
    cfg = cfg.replace(personalization="none", num_server_rounds=1, audit_examples=256)
    context, calls = client_context(cfg), _count_evaluations(monkeypatch)
    metrics = _evaluate(cfg, context, 1, three_labels)
    assert metrics[keys.M_ACCURACY_GLOBAL] == metrics[keys.M_ACCURACY_PERSONALIZED]
    assert metrics[keys.M_MIA_GLOBAL] == metrics[keys.M_MIA_PERSONALIZED]
    # Once on the held-out split, once on the training examples of the audit.
    assert len(calls) == 2


def test_the_audit_compares_a_bounded_sample_and_reports_its_size(cfg, three_labels, monkeypatch):
    cfg = cfg.replace(num_server_rounds=1, audit_examples=3)
    context, calls = client_context(cfg), _count_evaluations(monkeypatch)
    metrics = _evaluate(cfg, context, 1, three_labels)
    assert metrics[keys.M_MIA_EXAMPLES] == 6  # 3 training + 3 held-out examples
    assert sorted(calls)[:2] == [3, 3]  # the audit's two passes (global, personalized) over 3 examples
    off = _evaluate(
        cfg.replace(audit_examples=0), client_context(cfg.replace(audit_examples=0)), 1, three_labels
    )
    assert keys.M_MIA_GLOBAL not in off and keys.M_ACCURACY_GLOBAL in off
    assert RunConfig.from_flat({}).privacy.audit_examples == 0  # the audit is opt-in


def _held_out_size(cfg, partition_id=0):
    from fedlora.data import load_client_data

    return len(load_client_data(cfg.data, cfg.model.task, partition_id, 3, cfg.federation.seed).test_texts)


def test_rounds_before_the_last_measure_the_same_seeded_sample(cfg, three_labels, monkeypatch):
    cfg = cfg.replace(num_server_rounds=3, eval_examples=2)
    context, calls = client_context(cfg), _count_evaluations(monkeypatch)
    held_out = _held_out_size(cfg)
    assert held_out > 2
    first = _evaluate(cfg, context, 1, three_labels)
    assert first[keys.M_NUM_EXAMPLES] == 2 and calls == [2, 2]  # global and personalized, on the sample
    seen: list[list[int]] = []
    real_subset = fedlora.train.loops.Tokenized.subset

    def recorded(self, rows):
        seen.append(list(rows))
        return real_subset(self, rows)

    monkeypatch.setattr(fedlora.train.loops.Tokenized, "subset", recorded)
    _evaluate(cfg, context, 2, three_labels)
    _evaluate(cfg, context, 1, three_labels)
    assert len(seen) == 2 and seen[0] == seen[1]  # the same rows, round after round
    calls.clear()
    last = _evaluate(cfg, context, 3, three_labels)  # the last round measures the whole split
    assert last[keys.M_NUM_EXAMPLES] == held_out and calls == [held_out, held_out]
    everything = cfg.replace(eval_examples=0)
    calls.clear()
    assert _evaluate(everything, client_context(everything), 1, three_labels)[keys.M_NUM_EXAMPLES] == held_out
