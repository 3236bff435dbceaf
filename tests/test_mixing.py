"""The validation split, the global/personalized mixture, paired gains, and sweep statistics."""

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch

from fedlora.client.measure import MIX_GRID, Gain, gain, measure, scores
from fedlora.client.setup import validation_split
from fedlora.config import TrainConfig
from fedlora.core.stats import t_interval
from fedlora.lora.protocol import ClientView
from fedlora.personalization.base import Local
from fedlora.personalization.dual import Dual
from fedlora.train import evaluate, tokenize
from fedlora.train.local import train_shared, use_adapter
from fedlora.train.loops import compare

TEXTS = [f"goal match team {i}" for i in range(12)] + [f"song band guitar {i}" for i in range(12)]
LABELS = [0] * 12 + [1] * 12


def test_t_interval_matches_a_hand_computed_case():
    # Mean 2.5, sd sqrt(5/3) = 1.2910, t(0.975, 3) = 3.1824: half-width 3.182446 * 0.645497 = 2.054260.
    interval = t_interval([1.0, 2.0, 3.0, 4.0])
    assert interval.n == 4 and interval.mean == pytest.approx(2.5)
    assert interval.sd == pytest.approx(1.290994, abs=1e-6)
    assert interval.low == pytest.approx(0.445740, abs=1e-5)
    assert interval.high == pytest.approx(4.554260, abs=1e-5)
    assert interval.excludes_zero
    # Two values: t(0.975, 1) = 12.706; NaNs are left out; one value has no interval.
    two = t_interval([1.0, 3.0, math.nan])
    assert two.n == 2 and two.low == pytest.approx(2.0 - 12.7062, abs=1e-3) and not two.excludes_zero
    one = t_interval([0.7])
    assert one.mean == 0.7 and math.isnan(one.sd) and math.isnan(one.low) and not one.excludes_zero


def test_paired_gain_and_its_standard_error_by_hand():
    # Differences 1, 0, 1, 0: mean 0.5, sd sqrt(1/3), se sqrt(1/3)/2 = 0.288675.
    found = gain((1.0, 1.0, 1.0, 0.0), (0.0, 1.0, 0.0, 0.0), causal=False)
    assert found.mean == pytest.approx(0.5) and found.se == pytest.approx(0.288675, abs=1e-6)
    assert found.verdict() == 0  # 0.5 <= 1.96 * 0.2887: a tie within this client's noise
    assert Gain(0.5, 0.1).verdict() == 1 and Gain(-0.5, 0.1).verdict() == -1
    assert Gain(math.nan, math.nan).verdict() == 0
    assert math.isnan(gain((), (), causal=False).mean)


def test_the_validation_split_is_seeded_disjoint_and_held_out_of_training(tiny_model):
    data = tokenize(tiny_model.tokenizer, TEXTS, LABELS, 16)
    kept, held = validation_split(data, 0.2, seed=3, partition_id=1)
    assert held is not None and len(held) == 5 and len(kept) == 19  # max(1, round(24 * 0.2))
    rows = {tuple(r.tolist()) for r in data.input_ids}
    kept_rows = {tuple(r.tolist()) for r in kept.input_ids}
    held_rows = {tuple(r.tolist()) for r in held.input_ids}
    assert kept_rows | held_rows == rows and not kept_rows & held_rows
    again = validation_split(data, 0.2, seed=3, partition_id=1)[1]
    other = validation_split(data, 0.2, seed=4, partition_id=1)[1]
    assert again is not None and torch.equal(again.input_ids, held.input_ids)
    assert other is not None and not torch.equal(other.input_ids, held.input_ids)
    one = data.subset([0])
    assert validation_split(one, 0.2, seed=3, partition_id=1) == (one, None)


def _setups(loaded, glob, personal):
    local = Local(loaded, None, None, ClientView(glob, glob), TrainConfig(), 0)  # type: ignore[arg-type]

    def first():
        use_adapter(loaded, glob)

    def second():
        Dual().prepare(local, personal)

    return first, second


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_a_mixture_is_exact_at_its_ends_and_scores_like_evaluate(task, tiny_model):
    from fedlora.config import ModelConfig
    from fedlora.models import build_model

    if task == "classification":
        loaded, data = tiny_model, tokenize(tiny_model.tokenizer, TEXTS, LABELS, 16)
    else:
        loaded = build_model(ModelConfig(model="tiny-llama", task="causal-lm", max_length=16), 0, seed=0)
        data = tokenize(loaded.tokenizer, ["to be or not to be", "that is the question"] * 3, None, 16)
    cfg = TrainConfig(batch_size=4, learning_rate=5e-2, local_steps=4, personal_steps=4)
    glob, _ = train_shared(loaded, data, loaded.initial_global, cfg, seed=0)
    personal, _ = Dual().update(Local(loaded, data, data, ClientView(glob, glob), cfg, 1), None)
    first, second = _setups(loaded, glob, personal)
    first()
    alone_first = evaluate(loaded.model, data)
    second()
    alone_second = evaluate(loaded.model, data)
    for weight, same_as in ((0.0, alone_first), (1.0, alone_second)):
        both = compare(loaded.model, data, first, second, weight=weight, batch_size=5)
        for found, expected in (
            (both.first, alone_first),
            (both.second, alone_second),
            (both.mixed, same_as),
        ):
            assert found.loss == pytest.approx(expected.loss, rel=1e-5)
            assert found.accuracy == pytest.approx(expected.accuracy)
            assert found.example_losses == pytest.approx(expected.example_losses, rel=1e-5)
        assert both.mixture_loss(weight) == pytest.approx(same_as.loss, rel=1e-5)
    half = compare(loaded.model, data, first, second, weight=0.5)
    assert half.mixed.loss == pytest.approx(half.mixture_loss(0.5), rel=1e-5)
    # Mixing probabilities: the loss is convex in the weight, never above the worse end.
    assert half.mixed.loss <= max(alone_first.loss, alone_second.loss) + 1e-6
    best = half.best_weight(MIX_GRID)
    assert half.mixture_loss(best) == pytest.approx(min(half.mixture_loss(w) for w in MIX_GRID))


def test_a_personal_part_that_does_not_help_is_mixed_out(tiny_model):
    data = tokenize(tiny_model.tokenizer, TEXTS, LABELS, 16)
    flipped = tokenize(tiny_model.tokenizer, TEXTS, [1 - y for y in LABELS], 16)
    cfg = TrainConfig(batch_size=8, learning_rate=5e-2, local_steps=6, personal_steps=8)
    glob, _ = train_shared(tiny_model, data, tiny_model.initial_global, cfg, seed=0)
    view = ClientView(glob, glob)
    # Trained on the opposite labels, the personal adapter is worse than the global one here.
    harmful, _ = Dual().update(Local(tiny_model, flipped, data, view, cfg, 1), None)
    local = Local(tiny_model, data, data, view, cfg, 1, validation=data)
    plain = measure(Dual(), local, harmful, mix=False)
    mixed = measure(Dual(), local, harmful, mix=True)
    assert plain.personalized.loss > plain.global_only.loss
    assert mixed.weight == 0.0 and mixed.personalized.loss == pytest.approx(plain.global_only.loss, rel=1e-5)
    assert gain(mixed.personalized, mixed.global_only, causal=False).mean == 0.0
    # Trained on the right labels, it is kept.
    helpful, _ = Dual().update(Local(tiny_model, data, data, view, cfg, 1), None)
    kept = measure(Dual(), local, helpful, mix=True)
    assert kept.weight is not None and kept.weight > 0
    assert kept.personalized.loss <= kept.global_only.loss + 1e-6
    # No validation examples: the client keeps the global model.
    blind = measure(Dual(), dataclasses.replace(local, validation=None), helpful, mix=True)
    assert blind.weight == 0.0 and blind.personalized.loss == pytest.approx(blind.global_only.loss, rel=1e-5)
    assert scores(blind.personalized, causal=True) == tuple(-x for x in blind.personalized.example_losses)


def test_a_misspelt_sweep_setting_is_one_line_before_anything_runs(monkeypatch):
    import fedlora
    from fedlora import launch
    from fedlora.core.errors import ConfigError

    def no_flower():
        raise AssertionError("the sweep started Flower before checking its settings")

    monkeypatch.setattr(launch, "flower_session", no_flower)
    with pytest.raises(ConfigError) as err:
        fedlora.sweep(strategies=["fedavg", "fedprox"], lora_rnak=4)
    assert "lora-rnak" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="learning-rate"):
        fedlora.sweep(strategies=["fedavg"], learning_rate=5.0)


def test_a_sweep_starts_every_run_from_its_preset(monkeypatch, tmp_path):
    import contextlib

    import fedlora
    from fedlora import api, launch
    from fedlora.core.errors import ConfigError

    calls = []
    monkeypatch.setattr(launch, "flower_session", lambda *args, **kwargs: contextlib.nullcontext())
    monkeypatch.setattr(api, "run", lambda **kw: calls.append(kw) or SimpleNamespace())
    monkeypatch.setattr(api.Sweep, "append", lambda self, r: None)
    fedlora.sweep(preset="shakespeare-chat", seeds=[0, 1], rounds=2, out=tmp_path)
    # The preset's method, client count and settings; the caller's overrides win.
    assert [(c["personalization"], c["clients"], c["task"], c["rounds"], c["seed"]) for c in calls] == [
        ("finetune", 10, "chat", 2, 0),
        ("finetune", 10, "chat", 2, 1),
    ]
    with pytest.raises(ConfigError, match="preset: must be one of"):
        fedlora.sweep(preset="leaf")


def test_a_sweep_skips_only_what_the_methods_rules_exclude_and_says_why():
    from fedlora.api import _plan_sweep
    from fedlora.core.errors import ConfigError

    planned, skipped = _plan_sweep(["fedavg", "fedsa-lora"], ["dual", "fedsa-lora"], [0, 1], {}, None, {})
    ran = {(s, p) for _, s, p, _ in planned}
    assert ran == {("fedavg", "dual"), ("fedsa-lora", "fedsa-lora")}
    assert {(s, p) for s, p, _ in skipped} == {("fedavg", "fedsa-lora"), ("fedsa-lora", "dual")}
    assert all("does not fit strategy" in why for _, _, why in skipped)
    # The local-only baseline is measured once per seed, by the first run of that seed.
    assert [(flat["seed"], flat["local_only_baseline"]) for _, _, _, flat in planned] == [
        (0, True),
        (0, False),
        (1, True),
        (1, False),
    ]
    with pytest.raises(ConfigError, match="no combination to run"):
        _plan_sweep(["fedsa-lora"], ["ditto"], [0], {}, None, {})
    # A varied setting is an axis of its own, named in the run's folder.
    varied, _ = _plan_sweep(["fedavg"], ["dual"], [0], {"personal_mix": ["off", "validation"]}, None, {})
    assert [folder for folder, _, _, _ in varied] == [
        "fedavg__dual__personal-mix-off__seed0",
        "fedavg__dual__personal-mix-validation__seed0",
    ]


def _fake_run(folder, strategy, personalization, seed, personalized, glob, local=None):
    from fedlora.api import Results

    folder.mkdir(parents=True)
    config = {
        "strategy": strategy,
        "personalization": personalization,
        "seed": seed,
        "task": "classification",
    }
    (folder / "config.json").write_text(json.dumps(config))
    final = {
        "personalized_accuracy": personalized,
        "personalized_accuracy_worst10": personalized - 0.2,
        "global_accuracy": glob,
        "global_accuracy_worst10": glob - 0.3,
        "bytes_up_per_client_round": 1.0,
        "wall_s": 1.0,
    }
    if local is not None:
        final |= {"local_only_accuracy": local, "local_only_accuracy_worst10": local - 0.1}
    return Results({"final": final, "strategy": strategy, "personalization": personalization}, folder)


def test_a_sweep_summary_gives_intervals_over_seeds_and_paired_differences(tmp_path):
    from fedlora.api import Sweep

    runs = Sweep(
        [
            _fake_run(tmp_path / "a0", "fedavg", "dual", 0, 0.80, 0.60, local=0.70),
            _fake_run(tmp_path / "b0", "fedavg", "finetune", 0, 0.85, 0.60),
            _fake_run(tmp_path / "a1", "fedavg", "dual", 1, 0.90, 0.70, local=0.75),
            _fake_run(tmp_path / "b1", "fedavg", "finetune", 1, 0.93, 0.70),
            _fake_run(tmp_path / "a2", "fedavg", "dual", 2, 0.70, 0.50, local=0.65),
            _fake_run(tmp_path / "b2", "fedavg", "finetune", 2, 0.76, 0.50),
        ]
    )
    table = runs.summary(baseline="dual").set_index("personalization")
    assert list(table["config"]) == ["fedavg/dual", "fedavg/finetune"]
    dual, finetune = table.loc["dual"], table.loc["finetune"]
    assert dual["seeds"] == "0,1,2"
    expected = t_interval([0.80, 0.90, 0.70])
    assert dual["personalized_accuracy_mean"] == pytest.approx(0.80)
    assert dual["personalized_accuracy_ci_low"] == pytest.approx(expected.low)
    # Local-only comes from the run of the same seed that measured it.
    assert finetune["local_only_accuracy_mean"] == pytest.approx(0.70)
    # Paired by seed: +0.05, +0.03, +0.06 -> distinguishable from 0 although the spreads overlap.
    assert finetune["personalized_accuracy_vs_baseline_mean"] == pytest.approx(0.14 / 3)
    assert bool(finetune["personalized_accuracy_vs_baseline_distinguishable"])
    assert finetune["personalized_accuracy_ci_low"] < dual["personalized_accuracy_ci_high"]
    assert not bool(finetune["global_accuracy_vs_baseline_distinguishable"])  # identical: 0 +- 0
    assert list(runs.to_dataframe()["seed"]) == [0, 0, 1, 1, 2, 2]
    # A run's repr is one line of headline figures, not its whole summary.
    assert repr(runs[0]) == (
        f"Results(fedavg/dual, 0 rounds, accuracy: personalized 80.0%, global 60.0%, local-only 70.0%; "
        f"{tmp_path / 'a0'})"
    )


def test_the_summary_counts_clients_better_tied_and_worse_within_their_own_noise(tmp_path):
    from fedlora.core import keys
    from fedlora.core.stats import Gain
    from fedlora.server.evaluation import record_evaluation
    from fedlora.server.recorder import RunRecorder

    recorder = RunRecorder(tmp_path, {}, full_model_bytes=1)
    base = {keys.M_ACCURACY_GLOBAL: 0.5, keys.M_ACCURACY_PERSONALIZED: 0.6, keys.M_NUM_EXAMPLES: 10}
    clients = [
        ("0", {**base, keys.M_GAIN_GLOBAL: 0.30, keys.M_GAIN_GLOBAL_SE: 0.05, keys.M_MIX_WEIGHT: 1.0}),
        ("1", {**base, keys.M_GAIN_GLOBAL: 0.05, keys.M_GAIN_GLOBAL_SE: 0.05, keys.M_MIX_WEIGHT: 0.5}),
        ("2", {**base, keys.M_GAIN_GLOBAL: -0.20, keys.M_GAIN_GLOBAL_SE: 0.05, keys.M_MIX_WEIGHT: 0.0}),
        ("3", {**base, keys.M_GAIN_GLOBAL: 0.0, keys.M_GAIN_GLOBAL_SE: 0.0, keys.M_MIX_WEIGHT: 0.0}),
    ]
    record_evaluation(recorder.round(1), clients)
    recorder.local_only_gain = {"0": Gain(-0.5, 0.1), "1": Gain(0.01, 0.1)}
    final = recorder.summary()["final"]
    assert final["personalized_vs_global"] == {"better": 1, "tied": 2, "worse": 1}
    assert final["personalized_vs_local_only"] == {"better": 0, "tied": 1, "worse": 1}
    assert final["mix_weight"] == pytest.approx(0.375)
    per_client = recorder.summary()["per_client"]
    assert per_client["final_round"]["2"]["gain_over_global"] == -0.20
    assert per_client["local_only_gain"] == {"0": -0.5, "1": 0.01}


def test_a_classifier_chooses_its_mixture_by_accuracy_first_then_loss():
    import math as m

    from fedlora.train import EvalResult
    from fedlora.train.loops import Comparison

    # Three examples of class 0. The global model gives each p0 = 0.6 (all right, unsure); the
    # personalized one 0.99, 0.99 and 0.2 (surer, one wrong). The mixture's loss is lowest at
    # w = 0.5 (accuracy 2/3); example 3 stays right while 0.6 - 0.4 w > 0.5, i.e. w < 0.25.
    first = torch.log(torch.tensor([[0.6, 0.4]] * 3))
    second = torch.log(torch.tensor([[0.99, 0.01], [0.99, 0.01], [0.2, 0.8]]))
    labels = torch.zeros(3, dtype=torch.long)
    none = EvalResult(m.nan, m.nan, 0)
    found = Comparison(none, none, none, 0.0, first[:, 0], second[:, 0], first, second, labels)
    assert found.mixture_accuracy(0.0) == 1.0 and found.mixture_accuracy(1.0) == pytest.approx(2 / 3)
    by_loss = min(MIX_GRID, key=found.mixture_loss)
    assert by_loss == 0.5 and found.mixture_accuracy(by_loss) == pytest.approx(2 / 3)
    assert found.best_weight(MIX_GRID) == 0.2  # the surest mixture that keeps every example right
    # Causal LMs have no per-class record: the loss alone decides.
    lm = Comparison(none, none, none, 0.0, first[:, 0], second[:, 0])
    assert m.isnan(lm.mixture_accuracy(0.5)) and lm.best_weight(MIX_GRID) == 0.5


def test_personal_mix_refuses_methods_whose_prediction_it_cannot_mix():
    from fedlora import plan
    from fedlora.core.errors import PairingError

    plan.load({"personalization": "finetune", "personal-mix": "validation"})
    with pytest.raises(PairingError, match=r"^personal-mix: personalization 'feddpa' predicts through"):
        plan.load({"personalization": "feddpa", "personal-mix": "validation"})


def test_only_the_personal_part_gives_up_the_validation_split(tiny_cfg, jsonl_dir):
    from helpers import client_context

    from fedlora.client.setup import Client

    cfg = tiny_cfg.replace(data_dir=str(jsonl_dir), labels="cooking,music,sport", personal_mix="validation")
    client = Client(client_context(cfg))
    assert client.validation is not None and len(client.train) == client.data.num_train
    assert len(client.personal_train) + len(client.validation) == len(client.train)
    shared = client.local(None, 0, None, 1, personal=False)  # type: ignore[arg-type]
    personal = client.local(None, 0, None, 1, personal=True)  # type: ignore[arg-type]
    assert shared.train is client.train and personal.train is client.personal_train
    assert personal.validation is client.validation
    plain = Client(client_context(tiny_cfg.replace(data_dir=str(jsonl_dir), labels="cooking,music,sport")))
    assert plain.validation is None and plain.personal_train is plain.train
