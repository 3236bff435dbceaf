import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from helpers import metrics, reply

from fedlora.config import RunConfig
from fedlora.server.recorder import RunRecorder, worst_fraction_mean, worst_perplexity
from fedlora.server.recording import Recorded
from fedlora.strategies import build_strategy


def _train_reply(node: int, a: list[float], b: list[list[float]], n: int, loss: float):
    arrays = ArrayRecord(
        {"x.lora_A.weight": Array(np.array(a, np.float32)), "x.lora_B.weight": Array(np.array(b, np.float32))}
    )
    return reply(
        RecordDict(
            {"arrays": arrays, "metrics": metrics(num_examples=n, train_loss=loss, partition_id=node)}
        ),
        node,
    )


def _eval_reply(node: int, glob: float, pers: float):
    return reply(
        RecordDict(
            {
                "metrics": metrics(
                    num_examples=10, accuracy_global=glob, accuracy_personalized=pers, partition_id=node
                )
            }
        ),
        node,
        "evaluate",
    )


@pytest.fixture
def recorded(tmp_path: Path) -> Recorded:
    cfg = RunConfig()
    return Recorded(
        build_strategy("fedavg", cfg), RunRecorder(tmp_path, cfg.to_flat(), full_model_bytes=1000)
    )


def test_fedavg_weights_by_examples_hand_computed(recorded):
    replies = [
        _train_reply(1, [1.0, 2.0], [[0.0], [4.0]], n=1, loss=0.5),
        _train_reply(2, [3.0, 6.0], [[8.0], [0.0]], n=3, loss=1.5),
    ]
    arrays, _ = recorded.aggregate_train(1, replies)
    got = {k: v.numpy() for k, v in arrays.items()}
    # (1*[1,2] + 3*[3,6]) / 4 = [2.5, 5.0];  (1*[0,4] + 3*[8,0]) / 4 = [6, 1]
    np.testing.assert_array_equal(got["x.lora_A.weight"], [2.5, 5.0])
    np.testing.assert_array_equal(got["x.lora_B.weight"], [[6.0], [1.0]])
    record = recorded.recorder.round(1)
    assert record.clients_trained == 2 and record.clients_failed == 0
    assert record.train_loss == 1.0
    # bytes up: what Flower counts for each received ArrayRecord, added up.
    assert record.bytes_up == sum(r.content["arrays"].count_bytes() for r in replies)
    assert record.bytes_up >= 2 * (2 + 2) * 4


def test_evaluation_records_unweighted_mean_and_worst_clients(recorded):
    replies = [_eval_reply(i, glob=0.1 * i, pers=0.5 + 0.05 * i) for i in range(10)]
    recorded.aggregate_evaluate(2, replies)
    record = recorded.recorder.round(2)
    assert record.global_accuracy == pytest.approx(0.45)
    assert record.personalized_accuracy == pytest.approx(0.725)
    assert record.global_accuracy_worst10 == 0.0  # worst 1 of 10
    assert record.personalized_accuracy_worst10 == 0.5
    assert set(record.per_client) == {str(i) for i in range(10)}


def test_worst_fraction_mean():
    assert worst_fraction_mean([0.9, 0.5, 0.7, 0.8], 0.5) == pytest.approx(0.6)
    assert worst_fraction_mean([0.3] * 25) == pytest.approx(0.3)
    assert worst_fraction_mean([float(i) for i in range(25)]) == pytest.approx(1.0)  # ceil(2.5)=3: 0,1,2
    assert math.isnan(worst_fraction_mean([]))


def test_worst_perplexity_is_the_mean_of_the_highest():
    losses = [math.log(p) for p in (10.0, 40.0, 20.0, 30.0)]
    assert worst_perplexity(losses, 0.5) == pytest.approx(35.0)  # 40 and 30
    assert worst_perplexity(losses) == pytest.approx(40.0)  # ceil(0.4) = 1 client
    assert worst_perplexity([*losses, math.nan]) == pytest.approx(40.0)
    assert math.isnan(worst_perplexity([]))


def test_summary_has_the_documented_fields(recorded, tmp_path):
    recorded.aggregate_train(1, [_train_reply(1, [1.0], [[1.0]], n=2, loss=1.0)])
    recorded.aggregate_evaluate(1, [_eval_reply(1, 0.5, 0.75)])
    recorded.recorder.end_round(1)
    recorded.recorder.local_only = {"1": 0.6}
    summary = recorded.recorder.summary()
    assert [r["round"] for r in summary["rounds"]] == [1]
    assert set(summary["rounds"][0]) >= {
        "round",
        "global_accuracy",
        "personalized_accuracy",
        "bytes_up",
        "clients_trained",
    }
    final = summary["final"]
    assert set(final) >= {
        "global_accuracy",
        "personalized_accuracy",
        "personalized_accuracy_worst10",
        "local_only_accuracy",
        "bytes_up_per_client_round",
        "full_model_bytes",
        "wall_s",
    }
    assert final["personalized_accuracy"] == 0.75 and final["local_only_accuracy"] == 0.6
    assert final["bytes_up_per_client_round"] == summary["rounds"][0]["bytes_up"]
    assert (tmp_path / "summary.json").exists()


def _upload(node: int, arrays: dict, n: int = 1):
    record = ArrayRecord({k: Array(np.asarray(v, np.float32)) for k, v in arrays.items()})
    return reply(
        RecordDict({"arrays": record, "metrics": metrics(num_examples=n, train_loss=0.1, partition_id=node)}),
        node,
    )


GOOD = {"x.lora_A.weight": [[1.0, 2.0]], "x.lora_B.weight": [[1.0], [3.0]]}  # rank 1: A (1, 2), B (2, 1)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({**GOOD, "x.lora_A.weight": [[float("nan"), 2.0]]}, "tensor 'x.lora_A.weight' holds NaN or Inf"),
        ({**GOOD, "x.lora_B.weight": [[float("inf")], [3.0]]}, "tensor 'x.lora_B.weight' holds NaN or Inf"),
        ({"x.lora_A.weight": GOOD["x.lora_A.weight"]}, "missing tensor 'x.lora_B.weight'"),
        ({**GOOD, "y.weight": [1.0]}, "unexpected tensor 'y.weight'"),
        (
            {**GOOD, "x.lora_A.weight": [[1.0, 2.0, 3.0]]},
            "tensor 'x.lora_A.weight' has shape (1, 3), expected (1, 2)",
        ),
        (
            {"x.lora_A.weight": [[1.0, 2.0], [0.0, 1.0]], "x.lora_B.weight": [[1.0, 0.0], [3.0, 0.0]]},
            "tensor 'x.lora_A.weight' has shape (2, 2), expected (1, 2)",
        ),
        ({**GOOD, "x.lora_A.weight": [[100.0, 2.0]]}, "update norm 99 exceeds max-update-norm 10"),
    ],
)
def test_a_bad_upload_is_rejected_with_its_reason_and_the_rest_are_aggregated(tmp_path, bad, reason):
    from fedlora.server.validation import UploadCheck

    cfg = RunConfig()
    check = UploadCheck({"x.lora_A.weight": (1, 2), "x.lora_B.weight": (2, 1)}, max_norm=10.0)
    recorded = Recorded(
        build_strategy("fedavg", cfg), RunRecorder(tmp_path, cfg.to_flat(), full_model_bytes=1), check
    )
    recorded.round_start = {k: torch.tensor(v) for k, v in GOOD.items()}
    replies = [
        _upload(1, GOOD, n=1),
        _upload(2, bad, n=5),
        _upload(3, {**GOOD, "x.lora_A.weight": [[3.0, 4.0]]}, n=1),
    ]
    arrays, _ = recorded.aggregate_train(1, replies)
    # Node 2 is left out: the mean of nodes 1 and 3 only.
    np.testing.assert_array_equal(arrays["x.lora_A.weight"].numpy(), [[2.0, 3.0]])
    record = recorded.recorder.round(1)
    assert (record.clients_trained, record.clients_rejected, record.clients_failed) == (2, 1, 1)
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rejected = [e for e in events if e["event"] == "client-rejected"]
    assert len(rejected) == 1 and rejected[0]["node"] == 2 and rejected[0]["reason"].startswith(reason)


@pytest.mark.parametrize(
    ("claims", "kept", "reason"),
    [
        ([1, 1e12, 1], [[2.0, 3.0]], "num-examples 1000000000000 is outside [1, 1000]"),
        ([1, float("nan"), 1], [[2.0, 3.0]], "num-examples nan is not a whole number"),
        ([1, float("inf"), 1], [[2.0, 3.0]], "num-examples inf is not a whole number"),
        ([1, -5, 1], [[2.0, 3.0]], "num-examples -5 is outside [1, 1000]"),
        ([1, 2.5, 1], [[2.0, 3.0]], "num-examples 2.5 is not a whole number"),
        # Weights that would sum to zero (5 and -5): the negative claim is rejected.
        ([1, 5, -5], [[1.0, 2.0]], "num-examples -5 is outside [1, 1000]"),
    ],
)
def test_a_bad_weight_claim_is_rejected_and_the_rest_are_aggregated(tmp_path, claims, kept, reason):
    from fedlora.server.validation import UploadCheck

    cfg = RunConfig()
    check = UploadCheck({"x.lora_A.weight": (1, 2), "x.lora_B.weight": (2, 1)}, max_examples=1000)
    recorded = Recorded(
        build_strategy("fedavg", cfg), RunRecorder(tmp_path, cfg.to_flat(), full_model_bytes=1), check
    )
    a = [[1.0, 2.0], [50.0, 60.0], [3.0, 4.0]]
    if claims[1:] == [5, -5]:
        a = [[1.0, 2.0], [1.0, 2.0], [9.0, 9.0]]
    replies = [_upload(i + 1, {**GOOD, "x.lora_A.weight": [row]}, n=claims[i]) for i, row in enumerate(a)]
    arrays, _ = recorded.aggregate_train(1, replies)
    np.testing.assert_array_equal(arrays["x.lora_A.weight"].numpy(), kept)
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(e["event"] == "client-rejected" and e["reason"].startswith(reason) for e in events)


def test_every_weight_zero_keeps_the_global_adapter_without_a_division_by_zero(tmp_path):
    from fedlora.server.validation import UploadCheck

    cfg = RunConfig()
    check = UploadCheck({"x.lora_A.weight": (1, 2), "x.lora_B.weight": (2, 1)})
    recorded = Recorded(
        build_strategy("fedavg", cfg),
        RunRecorder(tmp_path, cfg.to_flat(), full_model_bytes=1),
        check,
        min_reply_fraction=0.5,
    )
    arrays, _ = recorded.aggregate_train(1, [_upload(1, GOOD, n=0), _upload(2, GOOD, n=0)])
    assert arrays is None  # not aggregated: the run goes on with the global adapter it had
    assert recorded.recorder.round(1).clients_rejected == 2


def test_under_client_level_dp_every_reply_must_weigh_one(tmp_path):
    from fedlora.server.validation import UploadCheck

    check = UploadCheck({"x.lora_A.weight": (1, 2)}, unit_weight=True)
    assert check.weight_problem({"num-examples": 4, "unit-weight": 1}) is None
    assert check.weight_problem({"num-examples": 4, "unit-weight": 50}) == (
        "unit-weight must be 1 under client-level DP, got 50"
    )


def test_heterogeneous_ranks_pass_the_shape_check_only_on_the_rank_dimension():
    from fedlora.server.validation import UploadCheck

    check = UploadCheck({"x.lora_A.weight": (8, 4), "x.lora_B.weight": (6, 8)}, any_rank=True)
    ok = {"x.lora_A.weight": torch.zeros(4, 4), "x.lora_B.weight": torch.zeros(6, 4)}
    assert check.problem(ok, {}) is None
    wrong = {"x.lora_A.weight": torch.zeros(4, 5), "x.lora_B.weight": torch.zeros(6, 4)}
    assert (
        check.problem(wrong, {})
        == "tensor 'x.lora_A.weight' has shape (4, 5), expected (8, 4) (any LoRA rank)"
    )


def test_the_summary_round_trips_through_its_typed_records(recorded):
    from fedlora.core.rundir import RunSummary

    recorded.aggregate_train(1, [_train_reply(1, [1.0], [[1.0]], n=2, loss=1.0)])
    recorded.aggregate_evaluate(1, [_eval_reply(1, 0.5, 0.75)])
    recorded.recorder.end_round(1)
    summary = recorded.recorder.summary(labels=["a"], strategy="fedavg", personalization="dual")
    record = RunSummary.from_dict(summary)
    assert json.dumps(record.to_dict()) == json.dumps(summary)
    assert record.final.personalized_accuracy == 0.75 and record.rounds[0].clients_trained == 1
    assert record.per_client.clients()["1"].global_accuracy == 0.5
    assert record.per_client.clients()["1"].epsilon is None  # no DP: no epsilon in the file either
    assert "epsilon" not in summary["per_client"]["final_round"]["1"]
