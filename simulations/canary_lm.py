"""Canary exposure on a pretrained causal LM, with DP-SGD off and on.

Runs the ``shakespeare`` preset (SmolLM2-135M, one client per play and role) with a
random secret ("my secret code is d d d d d d") inserted ``--repeats`` times into client
0's training lines, once without DP and once with DP-SGD calibrated so that every
client's whole run spends ``--epsilon`` (delta 1e-5). At the end client 0 ranks its
canary against 1,000 other secrets of the same format under the global and under its
personalized model; the exposure, log2(10^6) - log2(rank), is about 1 bit for a secret
the model has not memorised and 19.9 bits for one it ranks first (Carlini et al., "The
Secret Sharer", USENIX Security 2019). Runs already finished under ``--out`` with the
same configuration are read back, not repeated.

Usage: python simulations/canary_lm.py [--repeats 50] [--epsilon 8] [--rounds 3]
    [--out runs/canary-lm] [--run-config "model=tiny-llama ..."]
"""

from __future__ import annotations

import argparse

import fedlora
from fedlora.launch import parse_overrides


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=50, help="copies of the canary in client 0's lines")
    parser.add_argument("--epsilon", type=float, default=8.0, help="DP-SGD target epsilon of the DP run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--out", default="runs/canary-lm")
    parser.add_argument("--run-config", default="", help="overrides of the preset, e.g. model=tiny-llama")
    args = parser.parse_args()
    common = {
        **{k.replace("-", "_"): v for k, v in parse_overrides(args.run_config).items()},
        "canary_repeats": args.repeats,
        "canary_client": 0,
        "local_only_baseline": False,
    }
    settings = {"no DP": {}, f"DP-SGD, epsilon {args.epsilon:g}": {"dp_target_epsilon": args.epsilon}}
    print(
        f"shakespeare preset, {args.clients} clients, {args.rounds} rounds, "
        f"canary repeated {args.repeats} times in client 0's lines"
    )
    print(
        f"{'setting':<22} {'exposure global':>16} {'exposure personal':>18} "
        f"{'ppl global':>11} {'ppl personal':>13} {'epsilon':>8} {'wall s':>7}"
    )
    for name, extra in settings.items():
        slug = name.split(",")[0].replace(" ", "-").lower()
        run = fedlora.run(
            preset="shakespeare",
            clients=args.clients,
            rounds=args.rounds,
            out=f"{args.out}/{slug}",
            reuse=True,
            **common,
            **extra,
        )
        f = run.final
        print(
            f"{name:<22} {f['canary_exposure_global']:>16.1f} {f['canary_exposure_personalized']:>18.1f} "
            f"{f['global_perplexity']:>11.1f} {f['personalized_perplexity']:>13.1f} "
            f"{f['epsilon_max']:>8.2f} {f['wall_s']:>7.0f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
