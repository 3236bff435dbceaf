"""A ClientApp whose clients 2 and up send hostile replies to a real ServerApp.

Clients 0 and 1 behave. Clients 2 to ``len(NAMED) + 1`` each send one named attack, on
their train reply, their evaluate reply, or both, after fedlora's own handler ran (as a
device whose owner rewrote its replies would). Clients from ``FUZZ_FROM`` on do not train:
each message gets a reply generated from a seeded random mutation of a valid-looking one
(`mutate`), so that every generated reply is invalid in its own way.
"""

from __future__ import annotations

import math
import os
import random

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fedlora import client_app
from fedlora.client.state import node_state_mod
from fedlora.core import keys

# partition id -> (what its train reply does, what its evaluate reply does); None: behaves.
NAMED: dict[int, tuple[str | None, str | None]] = {
    2: ("huge-values", None),  # every value 1e30: a finite but huge upload
    3: ("claims-100000", None),  # an honest upload that claims 100,000 examples
    4: ("string-dtype", "partition-id-inf"),
    5: ("extra-metric", "num-examples-inf"),
    6: ("float64", "accuracy-1000"),
    7: ("int8", "extra-metric"),
    8: ("nan", None),
    9: ("missing-tensor", None),
    10: ("extra-tensor", None),
    11: ("double-rank", None),
    12: ("plus-1000", None),
    13: ("claims-1e12", None),
    14: ("claims-nan", None),
    15: ("claims-inf", None),
    16: ("claims-minus-3", None),
    17: ("claims-0", None),
    18: (None, "partition-id-of-client-0"),
}
FUZZ_FROM = 19
# A benchmark may move the attackers: with FEDLORA_HOSTILE_FROM=8, client 8 sends the attack
# listed for client 2, client 9 that of client 3, and so on; clients below it behave.
_SHIFT = int(os.environ.get("FEDLORA_HOSTILE_FROM", "2")) - 2


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    return {k: np.array(a.numpy(), copy=True) for k, a in reply.content[keys.ARRAYS].items()}


def _set_metric(reply: Message, key: str, value: float) -> None:
    metrics = dict(reply.content.metric_records[keys.METRICS])
    metrics[key] = value
    reply.content[keys.METRICS] = MetricRecord(metrics)


def _attack(reply: Message, attack: str) -> None:
    claims = {"claims-100000": 100_000, "claims-1e12": 1e12, "claims-nan": math.nan}
    claims |= {"claims-inf": math.inf, "claims-minus-3": -3.0, "claims-0": 0.0}
    if attack in claims:
        _set_metric(reply, keys.M_NUM_EXAMPLES, claims[attack])
        return
    metric_attacks = {
        "partition-id-inf": (keys.M_PARTITION_ID, math.inf),
        "num-examples-inf": (keys.M_NUM_EXAMPLES, math.inf),
        "accuracy-1000": (keys.M_ACCURACY_GLOBAL, 1000.0),
        "extra-metric": ("my-metric", 1.0),
        "partition-id-of-client-0": (keys.M_PARTITION_ID, 0),
    }
    if attack in metric_attacks:
        _set_metric(reply, *metric_attacks[attack])
        return
    state = _arrays(reply)
    first = next(k for k in state if "lora_A" in k)
    if attack == "huge-values":
        state = {k: np.full_like(v, 1e30) for k, v in state.items()}
    elif attack == "string-dtype":
        state[first] = np.full(state[first].shape, "x")
    elif attack == "float64":
        state = {k: v.astype(np.float64) for k, v in state.items()}
    elif attack == "int8":
        state = {k: v.astype(np.int8) for k, v in state.items()}
    elif attack == "nan":
        state[first].flat[0] = np.nan
    elif attack == "missing-tensor":
        del state[first]
    elif attack == "extra-tensor":
        state["classifier.extra.weight"] = np.zeros(3, np.float32)
    elif attack == "double-rank":
        state[first] = np.concatenate([state[first], state[first]])
    elif attack == "plus-1000":
        state[first] += 1e3
    reply.content[keys.ARRAYS] = ArrayRecord({k: Array(v) for k, v in state.items()})


def hostile_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    pid = int(context.node_config["partition-id"]) - _SHIFT
    if pid >= FUZZ_FROM:
        return fuzzed(message, pid + _SHIFT)
    reply = call_next(message, context)
    kind = message.metadata.message_type
    train, evaluate = NAMED.get(pid, (None, None)) if pid >= 2 else (None, None)
    attack = train if kind == "train" else evaluate if kind == "evaluate" else None
    if attack and not reply.has_error():
        _attack(reply, attack)
    return reply


# What a valid-looking reply of each kind carries (the tiny federation of the test: no DP, no audits).
TRAIN_METRICS = {"num-examples": 16, "train-loss": 1.0, "train-steps": 2, "train-wall-s": 0.5}
EVALUATE_METRICS = {
    "num-examples": 4,
    "personal-steps": 1,
    "personal-loss": 1.0,
    "personal-rounds": 1,
    "accuracy-global": 0.5,
    "accuracy-personalized": 0.5,
    "loss-global": 1.0,
    "loss-personalized": 1.0,
    "gain-over-global": 0.0,
    "gain-over-global-se": 0.1,
}
_DTYPES = (np.float64, np.float16, np.int8, np.int64, np.bool_, np.complex64, np.uint8)


def mutate(rng: random.Random, kind: str, arrays: dict[str, np.ndarray], pid: int) -> RecordDict:
    """A reply of ``kind`` built from valid-looking parts with one thing wrong, chosen by ``rng``."""
    metrics: dict[str, float | int | list[float]] = dict(
        TRAIN_METRICS if kind == "train" else EVALUATE_METRICS
    )
    metrics["partition-id"] = pid
    records: dict[str, np.ndarray | Array] = dict(arrays)
    extra: dict[str, object] = {}
    array_mutations = ["dtype", "shape", "drop-tensor", "add-tensor", "bad-bytes", "stype", "nan-tensor"]
    mutation = rng.choice(
        ["extra-key", "drop-key", "bad-value", "fractional-count", "list-value", "no-metrics", "two-metrics"]
        + ["config-record", "partition-id"]
        + (array_mutations if kind == "train" else ["array-record"])
    )
    name = rng.choice(sorted(arrays)) if arrays else None
    if mutation == "dtype" and name is not None:
        records[name] = arrays[name].astype(rng.choice(_DTYPES))
    elif mutation == "shape" and name is not None:
        records[name] = rng.choice([arrays[name][None], arrays[name][..., None], np.zeros((0,), np.float32)])
    elif mutation == "drop-tensor" and name is not None:
        del records[name]
    elif mutation == "add-tensor":
        records[f"base_model.model.x{rng.randrange(1000)}.lora_A.weight"] = np.zeros((2, 2), np.float32)
    elif mutation == "bad-bytes" and name is not None:
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        records[name] = Array(dtype="float32", shape=arrays[name].shape, stype="numpy.ndarray", data=data)
    elif mutation == "stype" and name is not None:
        a = Array(arrays[name])
        records[name] = Array(dtype=a.dtype, shape=a.shape, stype="torch.Tensor", data=a.data)
    elif mutation == "nan-tensor" and name is not None:
        bad = np.array(arrays[name], copy=True)
        bad.flat[rng.randrange(bad.size)] = rng.choice([math.nan, math.inf, -math.inf])
        records[name] = bad
    elif mutation == "extra-key":
        metrics[f"k{rng.randrange(10**6)}"] = rng.random()
    elif mutation == "drop-key":
        del metrics[rng.choice(sorted(k for k in metrics if k != "partition-id"))]
    elif mutation == "bad-value":
        # Out of every metric's range (NaN is a measurement that could not be made: not bad per se);
        # a gain is signed, so -1 is one of its values.
        key = rng.choice(sorted(metrics))
        signed = key.startswith("gain-over") and not key.endswith("-se")
        metrics[key] = rng.choice([math.inf, -math.inf, -1e300 if signed else -1.0, 1e300])
    elif mutation == "fractional-count":
        metrics[rng.choice(["num-examples", "partition-id"])] = 2.5
    elif mutation == "list-value":
        metrics[rng.choice(sorted(metrics))] = [1.0, 2.0]
    elif mutation == "partition-id":
        metrics["partition-id"] = rng.choice([-1, 10**7, 0.5, math.inf, math.nan])
    elif mutation == "config-record":
        extra["config"] = ConfigRecord({"x": 1})
    elif mutation == "array-record":
        extra["arrays"] = ArrayRecord({"x": Array(np.zeros(2, np.float32))})
    content = RecordDict({})
    if mutation != "no-metrics":
        content[keys.METRICS] = MetricRecord(metrics)  # type: ignore[arg-type]
    if mutation == "two-metrics":
        content["more-metrics"] = MetricRecord({"num-examples": 1})
    if kind == "train":
        content[keys.ARRAYS] = ArrayRecord(
            {k: v if isinstance(v, Array) else Array(v) for k, v in records.items()}
        )
    for record_name, record in extra.items():
        content[record_name] = record  # type: ignore[assignment]
    return content


def fuzzed(message: Message, pid: int) -> Message:
    """A generated invalid reply to ``message`` (train or evaluate), seeded by the client and round."""
    kind = message.metadata.message_type
    server_round = int(message.content.config_records[keys.CONFIG][keys.C_SERVER_ROUND])
    rng = random.Random(pid * 1000 + server_round * 10 + (kind == "train"))
    incoming = message.content.array_records.get(keys.ARRAYS)
    arrays = {k: a.numpy() for k, a in incoming.items()} if incoming is not None and kind == "train" else {}
    return Message(content=mutate(rng, kind, arrays, pid), reply_to=message)


app = ClientApp(mods=[hostile_mod, node_state_mod])
app.train()(client_app.train)
app.evaluate()(client_app.evaluate)
