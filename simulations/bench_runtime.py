"""Benchmark: a deployed device's round time, fedlora's own runtime against Flower's subprocess isolation.

Runs the deployment test's federation (a TLS SuperLink with node authentication on
loopback, one device, tiny-bert, 4 rounds) twice: first with `fedlora client` (one
long-lived runtime process serves every task), then with a plain `flower-supernode` under
Flower's subprocess isolation (a ClientApp process per message). Rounds 2-4 are timed from
each run's summary. Usage:

    python simulations/bench_runtime.py

Prints each run's round seconds and their ratio (below 1: fedlora's runtime is faster).
It drives `tests/test_deployment.py::test_only_the_operator_controls_devices_that_run_only_approved_apps` with
``FEDLORA_BENCH_RUNTIME=1``, so both federations are exactly the test's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST = "tests/test_deployment.py::test_only_the_operator_controls_devices_that_run_only_approved_apps"


def main() -> int:
    env = {**os.environ, "FEDLORA_BENCH_RUNTIME": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", TEST],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("round seconds:")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
        return 1
    print(lines[-1].replace("round seconds:", "round seconds (rounds 2-4):"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
