"""Every reply is screened before anything reads it: schemas, the update bounds, the weight cap."""

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from helpers import reply
from hostile_client import EVALUATE_METRICS, TRAIN_METRICS, mutate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.config import RunConfig
from fedlora.server.recorder import RunRecorder
from fedlora.server.recording import Recorded
from fedlora.server.schema import ReplySchema, expected_metrics
from fedlora.server.validation import UploadCheck, cap_shares
from fedlora.strategies import build_strategy

SHAPES = {"x.lora_A.weight": (1, 2), "x.lora_B.weight": (2, 1)}
GOOD = {
    "x.lora_A.weight": np.array([[1.0, 2.0]], np.float32),
    "x.lora_B.weight": np.array([[0.5], [1.0]], np.float32),
}


def _cfg(**flat) -> RunConfig:
    return RunConfig.from_flat({"num-server-rounds": 2, "min-reply-fraction": 0.0, **flat})


def _train(node: int, arrays=None, **metric_values):
    metrics = {**TRAIN_METRICS, "partition-id": node, **metric_values}
    content = RecordDict({"metrics": MetricRecord(metrics)})
    content["arrays"] = ArrayRecord({k: Array(v) for k, v in (arrays or GOOD).items()})
    return reply(content, node)


def _recorded(tmp_path: Path, cfg: RunConfig) -> Recorded:
    check = UploadCheck(SHAPES, max_norm_ratio=10.0, max_weight_share=0.5, cfg=cfg)
    recorded = Recorded(
        build_strategy("fedavg", cfg), RunRecorder(tmp_path, cfg.to_flat(), full_model_bytes=1), check
    )
    recorded.round_start = {k: __import__("torch").tensor(v) for k, v in GOOD.items()}
    return recorded


def _events(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if line]


def test_expected_metrics_follow_the_configuration():
    cfg = _cfg(**{"dp-noise-multiplier": 1.0, "audit-examples": 8})
    assert expected_metrics(cfg, "train", 1) == {
        "num-examples",
        "train-loss",
        "train-steps",
        "train-wall-s",
        "epsilon",
        "budget-exhausted",
    }
    final = expected_metrics(cfg, "evaluate", 2)
    assert {"mia-advantage-global", "accuracy-global", "epsilon"} <= final
    assert "mia-advantage-global" not in expected_metrics(cfg, "evaluate", 1)
    assert expected_metrics(_cfg(**{"evaluate-every": 5, "num-server-rounds": 6}), "evaluate", 1) == {
        "num-examples",
        "personal-steps",
        "personal-loss",
        "personal-rounds",
    }


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"arrays": {**GOOD, "x.lora_A.weight": np.array([["a", "b"]])}},
            "is <U1 (numpy.ndarray), expected float32",
        ),
        (
            {"arrays": {k: v.astype(np.float64) for k, v in GOOD.items()}},
            "is float64 (numpy.ndarray), expected float32",
        ),
        (
            {"arrays": {k: v.astype(np.int8) for k, v in GOOD.items()}},
            "is int8 (numpy.ndarray), expected float32",
        ),
        ({"my-metric": 1.0}, "unexpected metric 'my-metric'"),
        ({"partition-id": math.inf}, "metric 'partition-id' is inf, outside [0, 1e+09]"),
        ({"partition-id": 7}, "metric 'partition-id' is 7, not a partition of this run (0-3)"),
        ({"num-examples": math.inf}, "metric 'num-examples' is inf, outside [0, 1e+09]"),
        ({"train-loss": math.nan}, "metric 'train-loss' is NaN"),
        ({"train-steps": 2.5}, "metric 'train-steps' is 2.5, not a whole number"),
    ],
)
def test_each_malformed_train_reply_has_its_reason(change, reason):
    arrays = change.pop("arrays", None)
    message = _train(1, arrays, **change)
    assert reason in ReplySchema.for_round(_cfg(), "train", 1, num_partitions=4).problem(message)


def test_a_malformed_evaluate_reply_has_its_reason():
    schema = ReplySchema.for_round(_cfg(), "evaluate", 2, num_partitions=4)
    good = reply(
        RecordDict({"metrics": MetricRecord({**EVALUATE_METRICS, "partition-id": 1})}), 1, "evaluate"
    )
    assert schema.problem(good) is None
    bad = reply(
        RecordDict({"metrics": MetricRecord({**EVALUATE_METRICS, "accuracy-global": 1000.0})}), 1, "evaluate"
    )
    assert schema.problem(bad) == "metric 'accuracy-global' is 1000.0, outside [0, 1]"
    nan_ok = reply(
        RecordDict({"metrics": MetricRecord({**EVALUATE_METRICS, "loss-global": math.nan})}), 1, "evaluate"
    )
    assert schema.problem(nan_ok) is None  # a measurement that could not be made
    extra = RecordDict({"metrics": MetricRecord(EVALUATE_METRICS), "config": ConfigRecord({"x": 1})})
    assert schema.problem(reply(extra, 1, "evaluate")) == "unexpected config record 'config'"


def test_cap_shares_hand_computed():
    # 100,000 against 1 and 1, capped at half: the claimant holds half, the others a quarter each.
    assert cap_shares([1, 1, 100_000], 0.5) == pytest.approx([25_000.5, 25_000.5, 50_001.0])
    assert cap_shares([1, 2, 3], 0.5) == [1.0, 2.0, 3.0]  # nobody above half: unchanged
    # A cap below 1/n is raised to 1/n: two clients weigh the same.
    assert cap_shares([1, 3], 0.25) == [2.0, 2.0]
    # Two over the cap of 0.3: each holds 0.3 of 100; the others share 0.4 in proportion 1:3.
    assert cap_shares([50, 40, 2.5, 7.5], 0.3) == pytest.approx([30.0, 30.0, 10.0, 30.0])


def test_a_huge_upload_is_rejected_by_the_median_ratio_and_a_huge_claim_is_capped(tmp_path):
    # Prepare: three honest updates of norm 1, 2 and 3, one 1e30 upload, one claim of 100,000.
    recorded = _recorded(tmp_path, _cfg())
    a = GOOD["x.lora_A.weight"]
    moved = [{**GOOD, "x.lora_A.weight": a + np.float32([[d, 0.0]])} for d in (1.0, 2.0, 3.0)]
    huge = {k: np.full_like(v, 1e30) for k, v in GOOD.items()}
    replies = [
        _train(0, moved[0], **{"num-examples": 10}),
        _train(1, moved[1], **{"num-examples": 10}),
        _train(2, moved[2], **{"num-examples": 100_000}),
        _train(3, huge, **{"num-examples": 10}),
    ]

    # Execute
    arrays, _ = recorded.aggregate_train(1, replies)

    # Assert: the lower median of 1, 2, 3 and 1e30 is 2; 1e30 > 20 is dropped. Weights 10, 10,
    # 100,000 become 1/4, 1/4, 1/2: A = [1, 2] + (1/4 + 2/4 + 3/2) [1, 0] = [3.25, 2].
    np.testing.assert_allclose(arrays["x.lora_A.weight"].numpy(), [[3.25, 2.0]], rtol=1e-6)
    events = _events(tmp_path)
    (rejected,) = [e for e in events if e["event"] == "client-rejected"]
    assert rejected["client"] == "3" and "exceeds 10 x the round's median 2 " in rejected["reason"]
    (capped,) = [e for e in events if e["event"] == "weight-capped"]
    assert (capped["client"], capped["claimed"]) == ("2", 100_000)
    assert capped["weight"] == pytest.approx(50_010.0)
    record = recorded.recorder.round(1)
    assert (record.update_norm_median, record.update_norm_max) == (2.0, 3.0)


def test_a_partition_id_belongs_to_the_node_that_claimed_it_first(tmp_path):
    recorded = _recorded(tmp_path, _cfg())
    recorded.aggregate_train(1, [_train(0), _train(1)])
    thief = reply(
        RecordDict({"metrics": MetricRecord({**EVALUATE_METRICS, "partition-id": 0})}), 9, "evaluate"
    )
    honest = reply(
        RecordDict({"metrics": MetricRecord({**EVALUATE_METRICS, "partition-id": 0})}), 0, "evaluate"
    )
    recorded.aggregate_evaluate(1, [honest, thief])
    assert set(recorded.recorder.round(1).per_client) == {"0"}
    (rejected,) = [e for e in _events(tmp_path) if e["event"] == "client-rejected"]
    assert rejected == {**rejected, "node": 9, "client": "node-9", "reason": "partition-id 0 is node 0's"}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["train", "evaluate"]),
    server_round=st.sampled_from([1, 2]),
)
def test_no_generated_reply_gets_through_or_ends_the_round(tmp_path_factory, seed, kind, server_round):
    # Prepare: two honest replies and one generated by a random mutation of a valid one.
    tmp = tmp_path_factory.mktemp("fuzz")
    recorded = _recorded(tmp, _cfg())
    recorded.owners.num_partitions = 4
    bad = reply(mutate(random.Random(seed), kind, dict(GOOD) if kind == "train" else {}, 2), 2, kind)
    if kind == "train":
        honest = [_train(0), _train(1)]
        arrays, _ = recorded.aggregate_train(server_round, [*honest, bad])
        # Assert: the round aggregated the honest replies only, and the generated one is named.
        np.testing.assert_array_equal(arrays["x.lora_A.weight"].numpy(), GOOD["x.lora_A.weight"])
        assert recorded.recorder.round(server_round).clients_rejected == 1
    else:
        honest = [
            reply(
                RecordDict({"metrics": MetricRecord({**EVALUATE_METRICS, "partition-id": i})}), i, "evaluate"
            )
            for i in (0, 1)
        ]
        recorded.aggregate_evaluate(server_round, [*honest, bad])
        assert set(recorded.recorder.round(server_round).per_client) == {"0", "1"}
    assert [e["node"] for e in _events(tmp) if e["event"] == "client-rejected"] == [2]


def test_a_deployed_server_reads_no_client_data_and_no_model_outside_its_runs_folder(tmp_path, monkeypatch):
    from fedlora.core.errors import ConfigError
    from fedlora.server.runs_root import check_server_reads

    bundled = frozenset({"minilm", "tiny-bert"})
    root = tmp_path / "runs"
    (root / "models" / "mine").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(ConfigError, match=r"^labels: a deployed server reads no client data"):
        check_server_reads(RunConfig.from_flat({"data-dir": str(tmp_path / "elsewhere")}), bundled, root)
    check_server_reads(RunConfig.from_flat({"data-dir": "/srv", "labels": "a,b"}), bundled, root)
    check_server_reads(RunConfig.from_flat({"model": str(root / "models" / "mine")}), bundled, root)
    outside = (str(tmp_path / "elsewhere"), "~/mymodel", "org/some-model", str(root / "models" / ".." / ".."))
    for model in outside:
        with pytest.raises(ConfigError, match=r"^model: a deployed server loads a bundled model"):
            check_server_reads(RunConfig.from_flat({"model": model}), bundled, root)


def test_an_error_replys_reason_is_recorded_as_one_bounded_line(tmp_path):
    from flwr.app import Error, Message
    from helpers import as_server

    as_server()
    request = Message(content=RecordDict(), dst_node_id=5, message_type="train")
    flood = Message(Error(code=4100, reason="line one\nline two " + "x" * 10_000), reply_to=request)
    flood.metadata.__dict__["_src_node_id"] = 5
    recorded = _recorded(tmp_path, _cfg())
    recorded.aggregate_train(1, [_train(0), flood])
    (error,) = [e for e in _events(tmp_path) if e["event"] == "client-error"]
    assert error["reason"].startswith("line one line two xxx") and len(error["reason"]) == 500
