"""The server checkpoint: data only, and a resumed strategy goes on exactly as the original would."""

from __future__ import annotations

import json
import pickle
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from helpers import as_server, reply
from safetensors import safe_open
from safetensors.torch import save_file

from fedlora.config import RunConfig
from fedlora.core import keys
from fedlora.core.errors import ConfigError
from fedlora.core.rundir import RoundRecord
from fedlora.lora.adapters import from_record, to_record
from fedlora.lora.protocol import sent_parts
from fedlora.server.checkpoint import FILE, Checkpoint, load_checkpoint, restore_strategy, save_checkpoint
from fedlora.server.loop import build_strategy
from fedlora.server.resumable import check_resumable
from fedlora.strategies import STRATEGIES, strategy_info
from fedlora.strategies.base import initial_record

CONFIGS = [(name, {}) for name in STRATEGIES.names()] + [
    ("fedavg", {"client-dp": "server-clipping", "client-dp-noise-multiplier": 0.5}),
    ("fedavg", {"client-dp": "client-clipping", "client-dp-noise-multiplier": 0.5}),
]
NODES = [1, 2, 3]


class _Grid:
    """What a strategy's configure_train asks of Flower's grid."""

    def get_node_ids(self) -> list[int]:
        return list(NODES)


def _cfg(strategy: str, extra: dict) -> RunConfig:
    return RunConfig.from_flat({"model": "tiny-bert", "strategy": strategy, "fraction-train": 1.0, **extra})


def _round(strategy, server_round: int, arrays, start: dict, protocol, seed: int, unit: bool):
    """One round: the strategy configures it, three clients answer with seeded updates."""
    as_server()
    strategy.configure_train(server_round, arrays, ConfigRecord(), _Grid())
    gen = torch.Generator().manual_seed(seed)
    replies = []
    for i, node in enumerate(NODES):
        state = OrderedDict((k, v + 0.01 * torch.randn(v.shape, generator=gen)) for k, v in start.items())
        content = RecordDict(
            {
                "arrays": to_record(sent_parts(protocol, state)),
                "metrics": MetricRecord(
                    {keys.M_UNIT_WEIGHT if unit else keys.M_NUM_EXAMPLES: 1 if unit else 2 + i}
                ),
            }
        )
        replies.append(reply(content, node_id=node))
    new, _ = strategy.aggregate_train(server_round, replies)
    return new


@pytest.mark.parametrize(
    ("name", "extra"), CONFIGS, ids=[f"{n}{'-' + e['client-dp'] if e else ''}" for n, e in CONFIGS]
)
def test_a_resumed_strategy_aggregates_exactly_as_the_uninterrupted_one(tmp_path, tiny_model, name, extra):
    cfg = _cfg(name, extra)
    info = strategy_info(name)
    unit = bool(extra)
    original, num_nodes = build_strategy(cfg, None, lambda: len(NODES))
    arrays = to_record(initial_record(info, tiny_model.initial_global))
    start = tiny_model.initial_global
    arrays = _round(original, 1, arrays, start, info.protocol, seed=1, unit=unit)
    config = {**cfg.to_flat(), "labels": "a,b"}
    record = RoundRecord(1, clients_trained=3, global_accuracy=0.5)
    save_checkpoint(
        tmp_path, Checkpoint(1, from_record(arrays), {1: record}, config, 12.5, num_nodes), original
    )

    loaded = load_checkpoint(tmp_path, config)
    resumed, _ = build_strategy(cfg, loaded, lambda: pytest.fail("a resumed run keeps its population"))
    assert loaded.round == 1 and loaded.wall_s == 12.5 and list(loaded.rounds) == [1]
    assert json.dumps(asdict(loaded.rounds[1])) == json.dumps(asdict(record))  # NaN fields too
    assert loaded.num_nodes == num_nodes
    # In the same order too: Flower's server-side DP clipping pairs arrays by position.
    assert list(loaded.arrays) == list(arrays) and all(
        torch.equal(loaded.arrays[k], v) for k, v in from_record(arrays).items()
    )

    ours = _round(original, 2, arrays, start, info.protocol, seed=2, unit=unit)
    theirs = _round(resumed, 2, loaded.record(), start, info.protocol, seed=2, unit=unit)
    assert ours.keys() == theirs.keys()
    if unit:  # client-level DP adds fresh noise: compare what the accountant spent instead
        assert original.accountant.state_dict() == resumed.accountant.state_dict()
        assert original.accountant.num_releases == 2
    else:
        for k in ours:
            assert np.array_equal(ours[k].numpy(), theirs[k].numpy()), k


def test_moments_are_part_of_the_checkpoint(tmp_path, tiny_model):
    # Without FedAdam's moments restored, round 2 would differ: the test above can fail.
    cfg = _cfg("fedadam", {})
    info = strategy_info("fedadam")
    original, _ = build_strategy(cfg, None, lambda: 3)
    arrays = _round(
        original,
        1,
        to_record(initial_record(info, tiny_model.initial_global)),
        tiny_model.initial_global,
        info.protocol,
        seed=1,
        unit=False,
    )
    save_checkpoint(tmp_path, Checkpoint(1, from_record(arrays), {}, {}, 0.0), original)
    with safe_open(str(tmp_path / "checkpoint" / FILE), framework="pt") as fh:
        names = list(fh.keys())
        tree = json.loads(fh.metadata()["fedlora-server-checkpoint"])["strategy"]
    assert any(n.startswith("strategy.m_t/") for n in names) and any(
        n.startswith("strategy.v_t/") for n in names
    )
    assert tree["m_t"]["as"] == "numpy" and tree["eta"] == {"value": original.eta}


def test_a_pickled_checkpoint_is_never_loaded(tmp_path):
    class Boom:
        def __reduce__(self):
            return (Path.write_text, (tmp_path / "pwned", "ran"))

    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "server.pkl").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ConfigError, match=r"pickled checkpoint .* not loaded"):
        load_checkpoint(tmp_path, {})
    assert not (tmp_path / "pwned").exists()


def _write(tmp_path: Path, meta, tensors=None) -> None:
    (tmp_path / "checkpoint").mkdir(exist_ok=True)
    save_file(
        tensors or {"global/x": torch.zeros(2)},
        str(tmp_path / "checkpoint" / FILE),
        metadata=None if meta is None else {"fedlora-server-checkpoint": json.dumps(meta)},
    )


def _meta(**changes):
    meta = {
        "format": "fedlora-server-checkpoint",
        "version": 1,
        "round": 1,
        "wall_s": 0.0,
        "num_nodes": None,
        "global": ["x"],
        "config": {},
        "rounds": [],
        "strategy": {},
    }
    return {**meta, **changes}


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        (None, "not a readable fedlora checkpoint"),
        (_meta(format="something-else"), "not a readable fedlora checkpoint"),
        (_meta(version=99), "not a readable fedlora checkpoint"),
        (_meta(rounds=[{"round": 1, "__class__": "os.system"}]), "unknown fields"),
        (_meta(config=[1, 2]), "must be JSON objects"),
        (_meta(**{"global": ["y"]}), "the global arrays and their list differ"),
    ],
)
def test_an_altered_checkpoint_is_one_line_not_a_crash(tmp_path, meta, match):
    _write(tmp_path, meta)
    with pytest.raises(ConfigError, match=match):
        load_checkpoint(tmp_path, {})


def test_garbage_in_place_of_the_file_is_one_line(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / FILE).write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigError, match="not a readable fedlora checkpoint"):
        load_checkpoint(tmp_path, {})
    with pytest.raises(ConfigError, match="not a readable fedlora checkpoint"):
        check_resumable(tmp_path, {})


@pytest.mark.parametrize(
    ("meta", "config", "match"),
    [
        (None, {}, "not a readable fedlora checkpoint"),
        (_meta(version=99), {}, "not a readable fedlora checkpoint"),
        (_meta(config=[1, 2]), {}, "not a readable fedlora checkpoint"),
        (_meta(config={"lora-rank": 8}), {"lora-rank": 4}, "lora-rank: the resumed run has 4, its"),
    ],
)
def test_the_launchers_check_from_the_header_refuses_what_loading_refuses(tmp_path, meta, config, match):
    # The launcher reads only the header (no torch) before Flower starts; the ServerApp loads it whole.
    _write(tmp_path, meta)
    with pytest.raises(ConfigError, match=match):
        check_resumable(tmp_path, config)
    with pytest.raises(ConfigError, match=match):
        load_checkpoint(tmp_path, config)


def test_the_launchers_check_accepts_a_resumable_run_and_what_may_change(tmp_path):
    _write(tmp_path, _meta(config={"lora-rank": 8, "num-server-rounds": 3}))
    check_resumable(tmp_path, {"lora-rank": 8, "num-server-rounds": 5})  # more rounds: allowed
    with pytest.raises(ConfigError, match="has no checkpoint"):
        check_resumable(tmp_path / "elsewhere", {})


@pytest.mark.parametrize(
    ("tree", "match"),
    [
        ({"__class__": {"value": "x"}}, "which FedAdam does not have"),
        ({"train_metrics_aggr_fn": {"value": "os.system"}}, "is a str, the strategy's a function"),
        ({"eta": {"value": "fast"}}, "is a str, the strategy's a float"),
        ({"m_t": {"arrays": {"k": "missing"}, "as": "numpy"}}, "names an array it does not hold"),
        ({"eta": "raw"}, "is malformed"),
        ({"eta": {"object": {}}}, "is an object, the strategy's is not"),
    ],
)
def test_state_that_does_not_fit_the_strategy_is_refused_by_attribute(tmp_path, tree, match):
    _write(tmp_path, _meta(strategy=tree))
    checkpoint = load_checkpoint(tmp_path, {})
    strategy, _ = build_strategy(_cfg("fedadam", {}), None, lambda: 3)
    with pytest.raises(ConfigError, match=match):
        restore_strategy(strategy, checkpoint)
