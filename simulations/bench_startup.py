"""Benchmark: the fixed cost of a federation, by phase, and the launcher's own time.

Two measurements, each repeated (min / median / max), alternating between this checkout and
an optional other one (``--compare DIR``: an older checkout of fedlora, for before/after
figures side by side in one run, on one machine's load):

* **launcher**: ``fedlora simulate --preset shakespeare`` (SmolLM2, 10 roles) from the
  command's start to the moment it would start ``flwr run`` (it is stopped there): Python's
  start-up, imports, configuration and every check before Flower.
* **tiny federation** (tiny-bert, 2 clients, 1 round, well under a second of training),
  ``fedlora.run`` from call to return, split at the files the ServerApp writes: *launcher*
  (call to ``flwr run``), *to ServerApp* (``flwr run``, SuperLink, the simulation process,
  Ray, the ServerApp's imports and base model, until it writes ``config.json``), *rounds*
  (until ``summary.json``: actors start, import torch and train) and *after* (Ray's
  shutdown, the processes' exit, reading the results). *cold*: each run on its own;
  *session*: runs inside one ``fedlora.session()`` (its first run, which also starts the
  session's Ray, then the next ones), where the checkout has it; *warm*: the same in a
  ``fedlora.session(backend="warm")`` (no Ray: each run is forked from the session's warm
  process, started with its first run).
* **sweep** of 6 tiny runs in a warm session: its wall time from call to return against the
  sum of its runs' ServerApp times (what is left of the fixed cost per run).

Each measurement runs in a fresh interpreter of this environment. Usage:

    python simulations/bench_startup.py [--reps 3] [--compare DIR] [--skip-launcher] [--skip-sweep]
        [--modes cold,session,warm]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

# Runs in the child: stop `fedlora simulate` where it would start `flwr run`.
LAUNCHER = """
import os, subprocess, sys, time
real = subprocess.Popen
def popen(command, *args, **kwargs):
    if any(str(c).endswith("flwr") for c in command[:1]) and "run" in command[1:2]:
        print("AT", time.time(), flush=True)
        os._exit(0)
    return real(command, *args, **kwargs)
subprocess.Popen = popen
import fedlora
print("FROM", fedlora.__file__, flush=True)
from fedlora.cli import main
sys.exit(main(["simulate", "--preset", "shakespeare", "--out", sys.argv[1], "--overwrite"]))
"""

# Runs in the child: tiny federations, cold or in one session, each run's clock marks as JSON.
TINY = """
import contextlib, json, os, subprocess, sys, time
from pathlib import Path
import fedlora
from fedlora import launch
print("FROM", fedlora.__file__, flush=True)
mode, out, reps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
marks = {}
real = subprocess.Popen
def popen(command, *args, **kwargs):
    if any(str(c).endswith("flwr") for c in command[:1]) and "run" in command[1:2]:
        marks["flwr"] = time.time()
    return real(command, *args, **kwargs)
subprocess.Popen = popen
tiny = dict(clients=2, rounds=1, model="tiny-bert", max_length=16, local_steps=2, personal_steps=1,
            batch_size=8, local_only_baseline=False)
quiet = {"progress": False} if "progress" in fedlora.run.__code__.co_varnames else {}
session = (
    fedlora.session(backend="warm") if mode == "warm"
    else fedlora.session() if mode == "session" else contextlib.nullcontext()
)
opened = time.time()
with session:
    ready = time.time()
    for i in range(reps):
        run = out / f"run-{i}"
        marks.clear()
        call = time.time()
        fedlora.run(out=run, overwrite=True, **tiny, **quiet)
        back = time.time()
        print("RUN", json.dumps({
            "call": call, "flwr": marks.get("flwr", call), "config": (run / "config.json").stat().st_mtime,
            "summary": (run / "summary.json").stat().st_mtime, "back": back, "session": ready - opened,
        }), flush=True)
"""


def _child(tree: Path, code: str, *args: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    # Outside any checkout: `python -c` puts the working folder first on sys.path.
    with tempfile.TemporaryDirectory() as cwd:
        proc = subprocess.run(
            [sys.executable, "-c", code, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
            cwd=cwd,
        )
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: the measurement failed:\n{proc.stderr[-3000:]}")
    lines = proc.stdout.splitlines()
    where = next((x.split(" ", 1)[1] for x in lines if x.startswith("FROM ")), "")
    if not where.startswith(str(tree)):
        raise SystemExit(f"the measurement of {tree} ran fedlora from {where or 'nowhere'}")
    return lines


def _spread(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{min(values):5.1f} / {statistics.median(values):5.1f} / {max(values):5.1f}"


def launcher(trees: dict[str, Path], reps: int, tmp: Path) -> None:
    seconds: dict[str, list[float]] = {name: [] for name in trees}
    for rep in range(reps):
        for name, tree in trees.items():
            start = time.time()
            lines = _child(tree, LAUNCHER, str(tmp / f"launcher-{name}-{rep}"))
            seconds[name].append(float(next(x for x in lines if x.startswith("AT")).split()[1]) - start)
    print("\nlauncher: `fedlora simulate --preset shakespeare` until `flwr run` (s, min / median / max)")
    for name, values in seconds.items():
        print(f"  {name:<10} {_spread(values)}")


# Runs in the child: a sweep of 6 tiny runs in a warm session; its wall time and its runs' ServerApp times.
SWEEP = """
import json, sys, time
from pathlib import Path
import fedlora
print("FROM", fedlora.__file__, flush=True)
tiny = dict(clients=2, rounds=1, model="tiny-bert", max_length=16, local_steps=2, personal_steps=1,
            batch_size=8, local_only_baseline=False)
with fedlora.session(backend="warm"):
    start = time.time()
    done = fedlora.sweep(strategies=["fedavg", "fedprox", "ffa-lora"], seeds=[0, 1], out=Path(sys.argv[1]),
                         progress=False, **tiny)
    wall = time.time() - start
print("SWEEP", json.dumps({"wall": wall, "serverapp": [r.final["wall_s"] for r in done]}), flush=True)
"""


def _has_session(tree: Path) -> str:
    """The kinds of session ``tree`` has: "" (none), "session", or "session warm"."""
    text = (tree / "fedlora" / "api.py").read_text()
    if "def session(" not in text:
        return ""
    signature = text.split("def session(", 1)[1].split(")", 1)[0]
    return "session warm" if "backend:" in signature else "session"


def tiny(trees: dict[str, Path], reps: int, tmp: Path, only: set[str]) -> None:
    phases = ("launcher", "to ServerApp", "rounds", "after", "total")
    rows: dict[str, list[dict[str, float]]] = {}
    sessions: dict[str, list[float]] = {}
    for rep in range(reps):
        for name, tree in trees.items():
            modes = [m for m in ["cold", *_has_session(tree).split()] if m in only]
            for mode in modes:
                runs = {"cold": 1, "session": 2, "warm": 3}[mode]
                lines = _child(tree, TINY, mode, str(tmp / f"tiny-{name}-{mode}-{rep}"), str(runs))
                marks = [json.loads(x[4:]) for x in lines if x.startswith("RUN ")]
                for i, m in enumerate(marks):
                    label = f"{name} {mode}" + ("" if mode == "cold" else (" first" if i == 0 else " next"))
                    rows.setdefault(label, []).append(
                        {
                            "launcher": m["flwr"] - m["call"],
                            "to ServerApp": m["config"] - m["flwr"],
                            "rounds": m["summary"] - m["config"],
                            "after": m["back"] - m["summary"],
                            "total": m["back"] - m["call"],
                        }
                    )
                if mode != "cold":
                    sessions.setdefault(f"{name} {mode}", []).append(marks[0]["session"])
    print("\ntiny federation (tiny-bert, 2 clients, 1 round), by phase (s, min / median / max)")
    print(f"  {'':<22}" + "".join(f"{p:>22}" for p in phases))
    for label, measured in rows.items():
        print(f"  {label:<22}" + "".join(f"{_spread([m[p] for m in measured]):>22}" for p in phases))
    for name, values in sessions.items():
        print(
            f"  {name}: opening the session {_spread(values)} s"
            " (its Ray or warm process starts with its first run)"
        )
    base = next(iter(rows))
    for label, measured in rows.items():
        if label != base:
            ratio = statistics.median(m["total"] for m in measured) / statistics.median(
                m["total"] for m in rows[base]
            )
            print(f"  median total, {label} / {base}: {ratio:.2f}")


def sweep(trees: dict[str, Path], reps: int, tmp: Path) -> None:
    print(
        "\nsweep of 6 tiny runs in a warm session (s): wall time from call to return,"
        " and the sum of its runs' ServerApp times"
    )
    for name, tree in trees.items():
        if "warm" not in _has_session(tree):
            continue
        for rep in range(reps):
            lines = _child(tree, SWEEP, str(tmp / f"sweep-{name}-{rep}"))
            m = json.loads(next(x for x in lines if x.startswith("SWEEP "))[6:])
            total = sum(m["serverapp"])
            runs = ", ".join(f"{s:.1f}" for s in m["serverapp"])
            print(
                f"  {name} rep {rep}: wall {m['wall']:.1f}, ServerApp {total:.1f} (runs {runs}), "
                f"ratio {m['wall'] / total:.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--compare", type=Path, help="another fedlora checkout, measured alternately")
    parser.add_argument("--skip-launcher", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--modes", default="cold,session,warm", help="the tiny federation's modes to measure")
    args = parser.parse_args()
    trees = {"this": HERE}
    if args.compare:
        trees = {"compare": args.compare.resolve(), **trees}
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_launcher:
            launcher(trees, args.reps, Path(tmp))
        tiny(trees, args.reps, Path(tmp), set(args.modes.split(",")))
        if not args.skip_sweep:
            sweep(trees, max(1, args.reps // 2), Path(tmp))
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
