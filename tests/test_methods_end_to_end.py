"""Every strategy and personalization method through real Flower runs (tiny model, 2 rounds).

Each strategy runs once, paired with a personalization method so that every method runs
several times; every sixth case goes through the ``fedlora simulate`` command, the others
through the Python API (both call `fedlora.api.run`). Every case runs in the suite's warm
`fedlora.session` (the `warm` fixture), the command's by joining it through
``$FEDLORA_SESSION``; runs on Ray are tested in `test_end_to_end`. ``flora`` and
``flexlora`` run with mixed client ranks.
"""

from __future__ import annotations

import json
import math

import pytest
from helpers import session_processes, simulate_cli

import fedlora
import fedlora.plan
from fedlora.personalization import PERSONALIZATIONS
from fedlora.strategies import STRATEGIES

TINY = {"model": "tiny-bert", "max_length": 16, "local_steps": 2, "personal_steps": 1, "batch_size": 8}
MIXED_RANKS = "4,8,16"


def _cases() -> list[tuple[str, str]]:
    # From the registries, so that a new strategy or method runs here without editing this
    # file: each strategy once, with its own method if it has one, else the general methods
    # in turn (each of them several times).
    general = [name for name, cls in PERSONALIZATIONS.items() if cls.strategy is None]
    cases, turn = [], 0
    for name, info in STRATEGIES.items():
        if info.personalization is None:
            cases.append((name, general[turn % len(general)]))
            turn += 1
        else:
            cases.append((name, info.personalization))
    return cases


CASES = _cases()


# The warm process serving each case: one process, the same for every case, and no Ray.
_WARM: list[set[int]] = []


@pytest.fixture(scope="module")
def _one_warm_process():
    """After the module: every case, the command's too, ran in the one warm process of the suite's session."""
    yield
    assert _WARM and all(warm == _WARM[0] for warm in _WARM) and all(len(warm) == 1 for warm in _WARM)


def test_the_cases_cover_every_registered_name():
    assert sorted(s for s, _ in CASES) == STRATEGIES.names()
    assert {p for _, p in CASES} == set(PERSONALIZATIONS)
    for strategy, personalization in CASES:  # every pairing is one the plan accepts
        fedlora.plan.load({"strategy": strategy, "personalization": personalization})


def _through_cli(strategy: str, personalization: str, out, clients: int, extra: dict) -> dict:
    overrides = " ".join(f"{k.replace('_', '-')}={v}" for k, v in {**TINY, **extra}.items())
    proc = simulate_cli(
        "--strategy",
        strategy,
        "--personalization",
        personalization,
        "--clients",
        str(clients),
        "--rounds",
        "2",
        "--out",
        str(out),
        "--run-config",
        overrides,
        # Without --backend the command joins $FEDLORA_SESSION; the first case names it.
        *(("--backend", "warm") if strategy == CASES[1][0] else ()),
    )
    assert "personalized" in proc.stdout
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "personalization"), CASES)
def test_strategy_and_personalization_run_end_to_end(
    tmp_path, warm, _one_warm_process, strategy, personalization
):
    heterogeneous = STRATEGIES[strategy].protocol.heterogeneous_ranks
    clients = 3 if heterogeneous else 2
    extra = {"local_only_baseline": False, **({"client_ranks": MIXED_RANKS} if heterogeneous else {})}
    # The first case of each method that can be mixed also mixes it with the global model.
    first = next(case for case in CASES if case[1] == personalization) == (strategy, personalization)
    mixes = first and PERSONALIZATIONS[personalization].mixable and personalization != "none"
    if mixes:
        extra["personal_mix"] = "validation"
    out = tmp_path / "run"
    if CASES.index((strategy, personalization)) % 6 == 1:
        summary = _through_cli(strategy, personalization, out, clients, extra)
    else:
        result = fedlora.run(
            strategy=strategy,
            personalization=personalization,
            clients=clients,
            rounds=2,
            out=out,
            **TINY,
            **extra,
        )
        summary = result.summary
        frame = result.to_dataframe()
        assert list(frame["round"]) == [1, 2] and set(frame["strategy"]) == {strategy}

    processes = session_processes(warm.home)
    assert not any(
        ray in cmd for cmd in processes.values() for ray in ("raylet", "gcs_server", "default_worker")
    )
    _WARM.append({pid for pid, cmd in processes.items() if "fedlora.launch.warm" in cmd})
    assert summary["strategy"] == strategy and summary["personalization"] == personalization
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    for r in summary["rounds"]:
        assert r["clients_trained"] == clients and r["clients_failed"] == 0
        assert 0.0 <= r["global_accuracy"] <= 1.0 and 0.0 <= r["personalized_accuracy"] <= 1.0
        assert r["bytes_up"] > 0 and math.isfinite(r["train_loss"])
        if personalization == "none":
            assert r["personalized_accuracy"] == r["global_accuracy"]
    final, per_client = summary["final"], summary["per_client"]["final_round"]
    # Every client is counted once as better, tied or worse than the global model.
    assert sum(final["personalized_vs_global"].values()) == clients
    if mixes:
        assert 0.0 <= final["mix_weight"] <= 1.0
        assert all(0.0 <= c["mix_weight"] <= 1.0 for c in per_client.values())
    if heterogeneous:
        assert json.loads((out / "config.json").read_text())["client-ranks"] == MIXED_RANKS
    assert (out / "global_adapter" / "adapter_model.safetensors").exists()
    folded = strategy in ("fedex-lora", "flora")
    assert (out / "global_adapter" / "base_delta.safetensors").exists() == folded
