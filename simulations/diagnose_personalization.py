"""Diagnosis: why a personalized model can be worse than the global one on small chat clients.

An in-process replica of a FedAvg federation (the same training and evaluation functions
the clients run, without Flower, so that every intermediate model can be measured) on the
`shakespeare-chat` preset: 10 roles of 18 to 40 training exchanges, SmolLM2-135M-Instruct,
batch 8 x 64 tokens, 4 shared steps per round, learning rate 2e-3. 20% of each role's
training exchanges are held out as its validation split (never trained on), so that every
variant below is scored on data none of it saw. Each round, for each role:

* ``global``: the new global adapter alone;
* ``dual``: the persistent personal adapter (`dual`), trained ``personal-steps`` more on
  top of the new global one; ``dual (reset)``: the same, restarted from its initial state
  each round (what over-fitting across rounds costs or brings); ``dual (stale)``: last
  round's personal adapter on top of the new global one, before its update (what a
  personal adapter trained against an older global adapter does);
* ``finetune``: a copy of the new global adapter fine-tuned for ``personal-steps``, with
  ``finetune (lr/4)`` and ``finetune (2 steps)`` for learning rate and steps;
* ``dual + mix``, ``finetune + mix``: the validation-chosen mixture with the global model.

Prints per round the mean response perplexity over roles of each, the number of roles on
which it is worse than the global model beyond noise (1.96 standard errors of the paired
per-example loss difference), and each method's mean personal train/held-out loss gap.
The check that the personalized model with a zero personal adapter is the global model
exactly (evaluation on the right adapter stack) runs first. Usage:

    python simulations/diagnose_personalization.py [--rounds 3] [--roles 10] [--personal-steps 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections import OrderedDict

import torch

from fedlora.client.measure import gain, measure
from fedlora.client.setup import validation_split
from fedlora.config import RunConfig
from fedlora.core.stats import t_interval
from fedlora.data import load_client_data
from fedlora.lora.protocol import ClientView
from fedlora.models import build_model
from fedlora.personalization.base import Local
from fedlora.personalization.dual import Dual, initial_personal
from fedlora.personalization.finetune import FineTune
from fedlora.presets import get_preset
from fedlora.train import evaluate
from fedlora.train.local import evaluate_adapter, train_shared
from fedlora.train.splits import tokenize_split


def _mean_state(states: list[OrderedDict], weights: list[int]) -> OrderedDict:
    total = sum(weights)
    return OrderedDict(
        (k, sum(s[k] * (w / total) for s, w in zip(states, weights, strict=True))) for k in states[0]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--roles", type=int, default=10)
    parser.add_argument("--personal-steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    preset = get_preset("shakespeare-chat")
    cfg = RunConfig.from_flat({**preset.config, "seed": args.seed, "personal-steps": args.personal_steps})
    loaded = build_model(cfg.model, 0, seed=args.seed)
    tok = loaded.tokenizer
    clients = []
    for pid in range(args.roles):
        data = load_client_data(cfg.data, cfg.model.task, pid, preset.clients, args.seed)
        train = tokenize_split(tok, cfg.model, data.train_texts, data.train_labels, where="train")
        test = tokenize_split(tok, cfg.model, data.test_texts, data.test_labels, where="test")
        kept, validation = validation_split(train, cfg.train.validation_fraction, args.seed, pid)
        clients.append({"train": kept, "validation": validation, "test": test, "dual": None, "reset": None})
    names = list(range(len(clients)))
    train_cfg = cfg.train
    variants = {
        "finetune (lr/4)": dataclasses.replace(train_cfg, learning_rate=train_cfg.learning_rate / 4),
        "finetune (2 steps)": dataclasses.replace(train_cfg, personal_steps=2),
    }

    # Evaluation on the right adapter stack: a zero personal adapter adds nothing.
    glob = loaded.initial_global
    zero = initial_personal(loaded)
    view = ClientView(glob, glob)
    first = clients[0]
    local = Local(loaded, first["train"], first["test"], view, train_cfg, 0)
    alone = evaluate_adapter(loaded, first["test"], glob)
    stacked = Dual().evaluate(local, zero)
    assert stacked.loss == alone.loss, (stacked.loss, alone.loss)
    print(f"check: dual with a zero personal adapter = global exactly (loss {alone.loss:.4f})", flush=True)

    for server_round in range(1, args.rounds + 1):
        start = time.perf_counter()
        states = []
        for pid, c in enumerate(clients):
            seed = args.seed * 1_000_003 + server_round * 10_007 + pid * 101
            state, _ = train_shared(loaded, c["train"], glob, train_cfg, seed=seed)
            states.append(state)
        glob = _mean_state(states, [len(c["train"]) for c in clients])
        view = ClientView(glob, glob)
        per: dict[str, list] = {}
        gaps: dict[str, list[float]] = {}
        for pid, c in enumerate(clients):
            seed = args.seed * 1_000_003 + server_round * 10_007 + pid * 101 + 1
            local = Local(loaded, c["train"], c["test"], view, train_cfg, seed, validation=c["validation"])
            results = {"global": evaluate_adapter(loaded, c["test"], glob)}
            if c["dual"] is not None:
                results["dual (stale)"] = Dual().evaluate(local, c["dual"])
            c["dual"], _ = Dual().update(local, c["dual"])
            results["dual"] = Dual().evaluate(local, c["dual"])
            fresh, _ = Dual().update(local, None)
            results["dual (reset)"] = Dual().evaluate(local, fresh)
            tuned, _ = FineTune().update(local, None)
            results["finetune"] = FineTune().evaluate(local, tuned)
            for name, variant in variants.items():
                other, _ = FineTune().update(dataclasses.replace(local, cfg=variant), None)
                results[name] = FineTune().evaluate(local, other)
            for name, method, stored in (("dual", Dual(), c["dual"]), ("finetune", FineTune(), tuned)):
                found = measure(method, local, stored, mix=True)
                results[f"{name} + mix"] = found.personalized
                per.setdefault(f"{name} + mix weight", []).append(found.weight)
                method.prepare(local, stored)
                on_train = evaluate(loaded.model, c["train"])
                gaps.setdefault(name, []).append(results[name].loss - on_train.loss)
            for name, result in results.items():
                per.setdefault(name, []).append(result)
        print(f"\nround {server_round} ({time.perf_counter() - start:.0f} s)", flush=True)
        print(
            "| model | perplexity, mean over roles [95% CI] | roles worse than global beyond noise | better |"
        )
        print("|---|---|---|---|")
        for name, found in per.items():
            if name.endswith("weight"):
                continue
            ppl = t_interval([math.exp(r.loss) for r in found])
            verdicts = [gain(r, g, causal=True).verdict() for r, g in zip(found, per["global"], strict=True)]
            print(
                f"| {name} | {ppl.mean:.1f} [{ppl.low:.1f}, {ppl.high:.1f}] | {verdicts.count(-1)} of "
                f"{len(found)} | {verdicts.count(1)} |"
            )
        for name, values in gaps.items():
            gap = sum(values) / len(values)
            print(f"{name}: held-out minus training loss of the personal model, mean over roles {gap:.3f}")
        for name in ("dual + mix weight", "finetune + mix weight"):
            print(f"{name}s per role: {', '.join(f'{w:.1f}' for w in per[name])}")
        print(
            "per-role perplexity (global / dual / finetune / dual+mix / finetune+mix): "
            + "; ".join(
                f"{pid}: "
                + " / ".join(
                    f"{math.exp(per[m][pid].loss):.0f}"
                    for m in ("global", "dual", "finetune", "dual + mix", "finetune + mix")
                )
                for pid in names
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
