"""The Python API's bookkeeping: results tables, and sweeps that reuse finished runs."""

from __future__ import annotations

import json

import pytest

import fedlora
from fedlora.api import load_results
from fedlora.config import RunConfig


def _finished(run_dir, *, strategy="fedavg", seed=0, clients=3, local=0.5, glob=0.4, pers=0.8, **flat):
    cfg = RunConfig.from_flat(
        {"strategy": strategy, "seed": seed, **{k.replace("_", "-"): v for k, v in flat.items()}}
    )
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({**cfg.to_flat(), "min-clients": clients}))
    final = {
        "global_accuracy": glob,
        "global_accuracy_worst10": glob / 2,
        "personalized_accuracy": pers,
        "personalized_accuracy_worst10": pers / 2,
        "local_only_accuracy": local,
        "local_only_accuracy_worst10": None if local is None else local / 2,
        "bytes_up_per_client_round": 100.0,
        "bytes_down_per_client_round": 200.0,
        "wall_s": 1.0,
    }
    rounds = [{"round": 1, "global_accuracy": glob, "personalized_accuracy": pers, "bytes_up": 300}]
    per_client = {"final_round": {"0": {"global_accuracy": glob, "personalized_accuracy": pers}}}
    summary = {
        "rounds": rounds,
        "final": final,
        "per_client": {**per_client, "local_only_accuracy": {"0": local}},
        "strategy": strategy,
        "personalization": "dual",
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))


def _fake_simulate(monkeypatch, finished):
    """Replace the federation: record (config, clients) and return ``finished``'s summary."""
    calls = []

    def simulate(cfg, *, num_clients, out_dir, **_):
        calls.append((cfg, num_clients))
        return json.loads((finished / "summary.json").read_text())

    monkeypatch.setattr("fedlora.launch.simulate", simulate)
    return calls


def test_sweep_reuses_finished_runs_of_the_same_configuration(tmp_path, monkeypatch):
    _finished(tmp_path / "fedavg__auto__seed0", local_only_baseline=True)
    _finished(tmp_path / "ffa-lora__auto__seed0", strategy="ffa-lora", local=None, local_only_baseline=False)
    calls = _fake_simulate(monkeypatch, tmp_path / "fedavg__auto__seed0")
    grid = fedlora.sweep(strategies=["fedavg", "ffa-lora"], out=tmp_path, reuse=True, clients=3)
    assert calls == [] and [r.strategy for r in grid] == ["fedavg", "ffa-lora"]
    table = grid.to_dataframe()
    # The baseline measured once per seed fills every row of that seed.
    assert list(table["local_only_accuracy"]) == [0.5, 0.5]
    assert list(table["personalized_accuracy"]) == [0.8, 0.8]
    assert set(grid.rounds()["strategy"]) == {"fedavg", "ffa-lora"}
    assert list(grid.per_client()["client"]) == ["0", "0"]


@pytest.mark.parametrize("change", [{"clients": 4}, {"lora_rank": 4}, {"rounds": 9}])
def test_sweep_runs_again_when_the_configuration_differs(tmp_path, monkeypatch, change):
    _finished(tmp_path / "fedavg__auto__seed0", local_only_baseline=True)
    calls = _fake_simulate(monkeypatch, tmp_path / "fedavg__auto__seed0")
    fedlora.sweep(strategies=["fedavg"], out=tmp_path, reuse=True, **{"clients": 3, **change})
    assert len(calls) == 1 and calls[0][0].federation.strategy == "fedavg"


def test_sweep_skips_combinations_the_configuration_rejects(tmp_path, monkeypatch):
    _finished(tmp_path / "r")
    calls = _fake_simulate(monkeypatch, tmp_path / "r")
    fedlora.sweep(
        strategies=["fedsa-lora", "fedavg"], personalizations=["ditto"], out=tmp_path / "s", clients=3
    )
    assert [(c.federation.strategy, c.federation.personalization) for c, _ in calls] == [("fedavg", "ditto")]
    assert calls[0][0].federation.local_only_baseline is True


def test_a_run_saved_before_a_config_key_existed_counts_as_that_key_at_its_default(tmp_path, monkeypatch):
    _finished(tmp_path / "fedavg__auto__seed0", local_only_baseline=True)
    saved = json.loads((tmp_path / "fedavg__auto__seed0" / "config.json").read_text())
    saved.pop("audit-wire-log")  # as written by an older fedlora
    (tmp_path / "fedavg__auto__seed0" / "config.json").write_text(json.dumps(saved))
    _finished(tmp_path / "x")
    calls = _fake_simulate(monkeypatch, tmp_path / "x")
    fedlora.sweep(strategies=["fedavg"], out=tmp_path, reuse=True, clients=3)
    assert calls == []
    # ... but asking for something other than that default runs again.
    fedlora.sweep(strategies=["fedavg"], out=tmp_path, reuse=True, clients=3, audit_wire_log="/tmp/w")
    assert len(calls) == 1


def test_per_client_gives_causal_lm_perplexities_in_client_order(tmp_path):
    import math

    _finished(tmp_path / "lm", task="causal-lm", dataset="shakespeare")
    summary = json.loads((tmp_path / "lm" / "summary.json").read_text())
    summary["per_client"] = {
        "final_round": {
            str(c): {"global_accuracy": 0.1, "global_loss": 5.0, "personalized_loss": 4.0} for c in (10, 2, 0)
        },
        "local_only_accuracy": {"0": 0.1, "2": 0.1, "10": 0.1},
        "local_only_loss": {"0": 4.5, "2": 4.5},  # client 10's baseline missing
    }
    (tmp_path / "lm" / "summary.json").write_text(json.dumps(summary))
    table = load_results(tmp_path / "lm").per_client()
    assert list(table["client"]) == ["0", "2", "10"]
    assert table["global_perplexity"].tolist() == pytest.approx([math.exp(5.0)] * 3)
    assert table["personalized_perplexity"].tolist() == pytest.approx([math.exp(4.0)] * 3)
    assert table["local_only_perplexity"].tolist()[:2] == pytest.approx([math.exp(4.5)] * 2)
    assert math.isnan(table["local_only_perplexity"].iloc[2])
    # A classifier's table has no perplexity columns.
    _finished(tmp_path / "cls")
    assert "global_perplexity" not in load_results(tmp_path / "cls").per_client()


def test_run_with_reuse_loads_a_finished_run_of_the_same_configuration(tmp_path, monkeypatch):
    _finished(tmp_path / "r", local_only_baseline=True)
    calls = _fake_simulate(monkeypatch, tmp_path / "r")
    assert fedlora.run(out=tmp_path / "r", clients=3, reuse=True).final["personalized_accuracy"] == 0.8
    assert calls == []
    fedlora.run(out=tmp_path / "r", clients=4, reuse=True)  # another client count: runs
    assert len(calls) == 1 and calls[0][1] == 4


def test_reuse_ignores_where_a_finished_run_kept_its_client_state(tmp_path, monkeypatch):
    # `fedlora simulate` records the client-state folder it chose; asking again without one is the same run.
    _finished(tmp_path / "r", local_only_baseline=True, client_state_dir=str(tmp_path / "r" / "clients"))
    calls = _fake_simulate(monkeypatch, tmp_path / "r")
    fedlora.run(out=tmp_path / "r", clients=3, reuse=True)
    assert calls == []


def test_run_and_sweep_show_their_progress_unless_told_not_to(tmp_path, monkeypatch, capsys):
    _finished(tmp_path / "done")
    seen = []

    def simulate(cfg, *, on_event, **_):
        for event in (
            {"event": "start"},
            {"event": "round", "round": 1, "global_accuracy": 0.5, "personalized_accuracy": 0.75},
            {"event": "round", "round": 2, "global_perplexity": 40.0, "personalized_perplexity": 30.25},
        ):
            if on_event is not None:  # None: nobody watches
                on_event(event)
        return json.loads((tmp_path / "done" / "summary.json").read_text())

    monkeypatch.setattr("fedlora.launch.simulate", simulate)
    fedlora.run(out=tmp_path / "a", clients=3, rounds=2, on_event=seen.append)
    lines = [line.rsplit("  (", 1)[0] for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        "starting Flower",
        "round 1/2  global 50.0%  personalized 75.0%",
        "round 2/2  perplexity global 40.0  personalized 30.2",
    ]
    assert [e["event"] for e in seen] == ["start", "round", "round"]  # the caller's own callback too
    fedlora.run(out=tmp_path / "b", clients=3, rounds=2, progress=False)
    assert capsys.readouterr().out == ""
    # A sweep names each run by its number and folder; a reused run says so.
    fedlora.sweep(strategies=["fedavg", "fedprox"], out=tmp_path / "s", clients=3, rounds=2)
    reused = tmp_path / "t" / "fedavg__auto__seed0"
    _finished(reused, local_only_baseline=True)
    fedlora.sweep(strategies=["fedavg"], out=tmp_path / "t", clients=3, reuse=True)
    out = capsys.readouterr().out
    assert "run 2/2 fedprox__auto__seed0: round 2/2  perplexity global 40.0" in out
    assert f"run 1/1 fedavg__auto__seed0: reused the finished run in {reused}" in out
