"""Benchmark: personalization methods, with and without the validation mixture, over several seeds.

One `fedlora.sweep` per setting, every method with ``personal-mix`` ``off`` and
``validation``, on each training seed with the data partition held fixed
(``partition-seed=0``), so that the intervals measure training noise on one split of the
data. Settings:

* ``default``: the default benchmark (MiniLM, BBC News, 20 clients with Dirichlet label
  skew, 5 rounds of 3 + 3 steps);
* ``small``: the same corpus over 40 clients (about half the examples each);
* ``chat``: the `shakespeare-chat` preset as it is (10 roles of 18 to 40 training
  exchanges, SmolLM2-135M-Instruct, 3 rounds; perplexity of the replies). Not fewer
  rounds: the personal adapter's over-fitting across rounds, which makes `dual` worse than
  the global model on small chat clients, shows in the third.

Prints per configuration the mean with its 95% Student's t interval of the personalized,
global and local-only figures and their worst 10%, the clients on which the personalized
model is better than, tied with (within the client's own noise: 1.96 standard errors of
its paired per-example gain) or worse than the global and the local-only model (means over
seeds), and the paired per-seed difference from ``dual``. Writes the table to
``simulations/results/personalization-<setting>.md`` and every run's row to a ``.csv``
next to it. Runs already finished in ``--out`` are reused, so an interrupted benchmark
goes on where it stopped. Each finished run's ``summary.json`` and ``config.json`` are kept in
``simulations/results/personalization-runs/<setting>/`` (a few kilobytes each, committed) and
copied back into ``--out`` before anything runs, so that a benchmark spread over several
machines or days reuses every run finished anywhere. Usage:

    python simulations/bench_personalization.py --setting default [--seeds 0,1,2]
        [--methods dual,finetune,ditto,feddpa,fedalt] [--strategies fedavg,fedalt]
        [--mix-methods dual] [--out runs/bench-personalization]

``--without-baseline`` runs only the configurations that follow a seed's first (which
measures the local-only baseline), exactly as the whole grid would run them: the
mixture's runs can go first, and the grid reuses them. ``--finished-only`` tabulates the
runs already finished in ``--out`` and runs nothing (a partial grid's table, while the rest
runs elsewhere). ``--mix-methods`` limits the
``personal-mix=validation`` variant to the methods named (all of them by default); runs go
seed by seed, so that an interrupted benchmark has every configuration on its first seeds
before it starts the next.

(Strategy and method pairs the methods' rules exclude, such as ``fedavg`` with ``fedalt``
or ``personal-mix`` with ``feddpa``, are skipped and listed.)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import shutil
from pathlib import Path
from typing import Any

import fedlora

RESULTS = Path(__file__).resolve().parent / "results"
# What a finished run needs to be reused (`fedlora.sweep(reuse=True)`) and tabulated.
KEPT, KEPT_FILES = RESULTS / "personalization-runs", ("summary.json", "config.json")
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {"clients": 20},
    "small": {"clients": 40},
    "chat": {"preset": "shakespeare-chat", "responses_per_client": 0},
}


def _cell(row: Any, figure: str, scale: float, digits: int) -> str:
    mean, low, high = (row[f"{figure}_{k}"] for k in ("mean", "ci_low", "ci_high"))
    if math.isnan(mean):
        return "n/a"
    if math.isnan(low):
        return f"{scale * mean:.{digits}f} (one seed)"
    return f"{scale * mean:.{digits}f} [{scale * low:.{digits}f}, {scale * high:.{digits}f}]"


def _counts(row: Any, versus: str) -> str:
    better, tied, worse = (
        row[f"{v}_{w}_{versus}"] for v, w in (("better", "than"), ("tied", "with"), ("worse", "than"))
    )
    if math.isnan(better):
        return "n/a"
    return f"{better:.1f} / {tied:.1f} / {worse:.1f}"


def table(summary: Any, causal: bool) -> str:
    """The summary as a Markdown table."""
    measure, scale, digits = ("perplexity", 1.0, 1) if causal else ("accuracy", 100.0, 1)
    head = (
        f"| configuration | personalized {measure} | worst 10% | global | worst 10% | local-only | "
        "vs global: better / tied / worse | vs local-only | mix weight | personalized - dual, paired |"
    )
    lines = [head, "|" + "---|" * 10]
    for _, row in summary.iterrows():
        diff, low, high = (
            row.get(f"personalized_{measure}_vs_baseline_{k}", math.nan)
            for k in ("mean", "ci_low", "ci_high")
        )
        paired = (
            f"{scale * diff:+.{digits}f} [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"
            if not math.isnan(low)
            else "n/a"
        )
        mix = row.get("mix_weight_mean", math.nan)
        lines.append(
            f"| {row['config']} | {_cell(row, f'personalized_{measure}', scale, digits)} "
            f"| {_cell(row, f'personalized_{measure}_worst10', scale, digits)} "
            f"| {_cell(row, f'global_{measure}', scale, digits)} "
            f"| {_cell(row, f'global_{measure}_worst10', scale, digits)} "
            f"| {_cell(row, f'local_only_{measure}', scale, digits)} "
            f"| {_counts(row, 'global')} | {_counts(row, 'local_only')} "
            f"| {'' if math.isnan(mix) else f'{mix:.2f}'} | {paired} |"
        )
    return "\n".join(lines)


def keep(result: fedlora.Results, kept: Path) -> None:
    """Copy a finished run's summary and configuration into ``kept``."""
    run = result.out_dir
    print(f"finished {run.name} in {result.final['wall_s']:.0f} s", flush=True)
    (kept / run.name).mkdir(parents=True, exist_ok=True)
    for name in KEPT_FILES:
        shutil.copyfile(run / name, kept / run.name / name)


def restore(out: Path, kept: Path) -> None:
    """Copy the kept runs into ``out`` where ``out`` has no finished run of that name."""
    for source in sorted(p.parent for p in kept.glob(f"*/{KEPT_FILES[0]}")):
        if not (out / source.name / KEPT_FILES[0]).exists():
            (out / source.name).mkdir(parents=True, exist_ok=True)
            for name in KEPT_FILES:
                shutil.copyfile(source / name, out / source.name / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="default")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="dual,finetune,ditto,feddpa,fedalt")
    parser.add_argument("--strategies", default="fedavg,fedalt")
    parser.add_argument("--mix", default="off,validation")
    parser.add_argument("--mix-methods", default="", help="methods that get the mix variants (default: all)")
    parser.add_argument(
        "--without-baseline",
        action="store_true",
        help="run the configurations after a seed's first only (its run measures the local-only baseline)",
    )
    parser.add_argument("--out", default="runs/bench-personalization")
    parser.add_argument(
        "--finished-only", action="store_true", help="tabulate the finished runs in --out; run nothing"
    )
    args = parser.parse_args()
    methods = args.methods.split(",")
    mixes = args.mix.split(",")
    mixed = args.mix_methods.split(",") if args.mix_methods else methods
    runs_of = {
        "strategies": args.strategies.split(","),
        "out": Path(args.out) / args.setting,
        "partition_seed": 0,
        "reuse": True,
        "on_run": lambda r: keep(r, KEPT / args.setting),
        **SETTINGS[args.setting],
    }
    restore(Path(args.out) / args.setting, KEPT / args.setting)
    sweep = fedlora.Sweep(varied=["personal-mix"])
    seen: set[Path] = set()
    if args.finished_only:
        done = sorted(p.parent for p in (Path(args.out) / args.setting).glob("*__seed*/summary.json"))
        sweep.extend(fedlora.load_results(run) for run in done)
        seen.update(done)
    with contextlib.nullcontext() if args.finished_only else fedlora.session():
        for seed in [] if args.finished_only else [int(s) for s in args.seeds.split(",")]:
            # The first configuration of a seed measures its local-only baseline: dual without
            # the mixture, as in a single sweep of the whole grid, so that finished runs match.
            rest = [m for m in methods if m not in mixed]
            for names, mix, baseline in ((mixed, mixes, True), (rest, mixes[:1], False)):
                if args.without_baseline and baseline:  # as the grid runs them after its first
                    names, mix, baseline = mixed, mixes[1:], False
                if not names or not mix:
                    continue
                part = fedlora.sweep(
                    personalizations=names,
                    seeds=[seed],
                    vary={"personal_mix": mix},
                    **runs_of,
                    **({} if baseline else {"local_only_baseline": False}),
                )
                sweep.extend(r for r in part if r.out_dir not in seen)
                seen.update(r.out_dir for r in part)
                sweep.skipped.extend(s for s in part.skipped if s not in sweep.skipped)
    for strategy, method, why in sweep.skipped:
        print(f"skipped {strategy}/{method}: {why}")
    runs = sweep.to_dataframe()
    baseline = f"fedavg/dual personal-mix={mixes[0]}"
    # A partial grid without the baseline's runs (`--without-baseline`) is tabulated without it.
    summary = sweep.summary(baseline=baseline if baseline in {sweep.label(r) for r in sweep} else None)
    causal = "personalized_perplexity" in runs.columns
    text = table(summary, causal)
    print(text)
    if args.without_baseline:  # a part of the grid: the committed tables stay the whole grid's
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"personalization-{args.setting}.md").write_text(text + "\n")
    runs.to_csv(RESULTS / f"personalization-{args.setting}.csv", index=False)
    sweep.per_client().to_csv(RESULTS / f"personalization-{args.setting}-clients.csv", index=False)


if __name__ == "__main__":
    main()
