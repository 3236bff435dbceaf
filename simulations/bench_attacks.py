"""Benchmark: a huge upload and a huge weight claim against the honest clients, with and without bounds.

The same simulated federation (bundled MiniLM on BBC News, Dirichlet partition) three ways,
on several seeds, on one SuperLink:

* **clean**: every client behaves;
* **attacked**: the last two clients attack (``tests/hostile_client.py``): one uploads
  every value as 1e30, one uploads an honest update but claims 100,000 training examples;
  the server runs with its defaults (``max-update-norm-ratio`` 10,
  ``max-client-weight-share`` 0.5);
* **attacked, no bounds**: the same attack with ``max-update-norm-ratio=inf`` and
  ``max-client-weight-share=1`` (the earlier defaults).

Prints, for the honest clients, the mean final global and personalized accuracy per seed,
their mean over seeds with a 95% t-interval, and the per-client wins and losses of each
attacked run against the clean run of its seed. Usage:

    python simulations/bench_attacks.py [--clients 10] [--rounds 3] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
from pathlib import Path

from fedlora.config import RunConfig
from fedlora.launch import flower_session, simulate, write_app

HOSTILE = Path(__file__).resolve().parents[1] / "tests" / "hostile_client.py"
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def interval(values: list[float]) -> str:
    """Mean and 95% t-interval half-width (n-1 degrees of freedom)."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return f"{100 * finite[0]:.1f}% (one seed)" if finite else "n/a"
    half = T95.get(len(finite) - 1, 1.96) * statistics.stdev(finite) / math.sqrt(len(finite))
    return f"{100 * statistics.mean(finite):.1f}% +- {100 * half:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    honest = [str(i) for i in range(args.clients - 2)]
    # The hostile app's attacks for its clients 2 and 3 go to the last two clients.
    os.environ["FEDLORA_HOSTILE_FROM"] = str(args.clients - 2)
    variants = {
        "clean": {},
        "attacked": {},
        "attacked, no bounds": {"max-update-norm-ratio": math.inf, "max-client-weight-share": 1.0},
    }
    results: dict[str, dict[int, dict[str, dict[str, float]]]] = {v: {} for v in variants}
    with tempfile.TemporaryDirectory() as tmp, flower_session() as session:
        app = write_app(Path(tmp) / "app", RunConfig())
        pyproject = app / "pyproject.toml"
        pyproject.write_text(pyproject.read_text().replace("fedlora.client_app:app", "hostile_client:app"))
        shutil.copy(HOSTILE, app / "hostile_client.py")
        for seed in seeds:
            for variant, extra in variants.items():
                flat = {"num-server-rounds": args.rounds, "seed": seed, "local-only-baseline": False, **extra}
                summary = simulate(
                    RunConfig.from_flat(flat),
                    num_clients=args.clients,
                    out_dir=Path(tmp) / f"{seed}-{variant}",
                    app_dir=None if variant == "clean" else app,
                    session=session,
                )
                final = summary["per_client"]["final_round"]
                results[variant][seed] = {c: final.get(c, {}) for c in honest}
                rejected = sum(r["clients_rejected"] for r in summary["rounds"])
                accuracy = [final.get(c, {}).get("global_accuracy", math.nan) for c in honest]
                print(
                    f"seed {seed} {variant:20} honest global {100 * statistics.fmean(accuracy):.1f}%, "
                    f"rejected uploads {rejected}",
                    flush=True,
                )
    print(f"\n{args.clients} clients ({len(honest)} honest), {args.rounds} rounds, seeds {seeds}")
    for model in ("global_accuracy", "personalized_accuracy"):
        print(f"\n{model.replace('_', ' ')} of the honest clients (mean over clients, then over seeds):")
        for variant in variants:
            means = [
                statistics.fmean(results[variant][s][c].get(model, math.nan) for c in honest) for s in seeds
            ]
            per_seed = ", ".join(f"{100 * m:.1f}" for m in means)
            print(f"  {variant:20} {interval(means):>18}   per seed: {per_seed}")
        for variant in ("attacked", "attacked, no bounds"):
            wins = losses = ties = 0
            for s in seeds:
                for c in honest:
                    got = results[variant][s][c].get(model, math.nan)
                    want = results["clean"][s][c].get(model, math.nan)
                    wins += got > want
                    losses += got < want or math.isnan(got)
                    ties += got == want
            print(f"  {variant} vs clean, per client and seed: {wins} better, {losses} worse, {ties} equal")


if __name__ == "__main__":
    main()
