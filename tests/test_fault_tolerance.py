"""Faults in a real federation: malformed uploads, and a server killed mid-run then resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_FEDERATION
from safetensors.numpy import load_file

import fedlora
from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError
from fedlora.launch import simulate, write_app

TESTS = Path(__file__).parent
TINY_FLAT = {
    "model": "tiny-bert",
    "max-length": 16,
    "local-steps": 2,
    "personal-steps": 1,
    "batch-size": 8,
    "local-only-baseline": False,
}


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]


@pytest.mark.federation
def test_each_malformed_update_is_rejected_by_name_and_the_run_completes(tmp_path):
    # Clients 1-5 each send one kind of bad upload (tests/faulty_client.py); client 0 behaves.
    app = write_app(tmp_path / "app", RunConfig())
    pyproject = app / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("fedlora.client_app:app", "faulty_client:app"))
    shutil.copy(TESTS / "faulty_client.py", app / "faulty_client.py")
    cfg = RunConfig.from_flat(
        {**TINY_FLAT, "num-server-rounds": 2, "min-reply-fraction": 0.0, "max-update-norm": 100.0}
    )
    summary = simulate(cfg, num_clients=6, out_dir=tmp_path / "run", app_dir=app)

    assert [r["clients_rejected"] for r in summary["rounds"]] == [5, 5]
    assert [r["clients_trained"] for r in summary["rounds"]] == [1, 1]
    reasons = {e["client"]: e["reason"] for e in _events(tmp_path / "run") if e["event"] == "client-rejected"}
    assert "NaN or Inf" in reasons["1"]
    assert reasons["2"].startswith("missing tensor")
    assert reasons["3"].startswith("unexpected tensor 'classifier.extra.weight'")
    assert "has shape (16," in reasons["4"]
    assert "exceeds max-update-norm 100" in reasons["5"]
    # The run went on: every client, the faulty ones too, evaluated the good client's global adapter.
    final = summary["per_client"]["final_round"]
    assert sorted(final) == [str(i) for i in range(6)]
    adapter = load_file(str(tmp_path / "run" / "global_adapter" / "adapter_model.safetensors"))
    assert all(np.isfinite(v).all() for v in adapter.values())


@pytest.mark.federation
def test_each_bad_weight_claim_is_rejected_by_name_and_the_run_completes(tmp_path):
    # Clients 1-5 claim 1e12, NaN, Inf, -3 and 0 training examples (tests/faulty_weights.py).
    app = write_app(tmp_path / "app", RunConfig())
    pyproject = app / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("fedlora.client_app:app", "faulty_weights:app"))
    shutil.copy(TESTS / "faulty_weights.py", app / "faulty_weights.py")
    cfg = RunConfig.from_flat({**TINY_FLAT, "num-server-rounds": 2, "min-reply-fraction": 0.0})
    summary = simulate(cfg, num_clients=6, out_dir=tmp_path / "run", app_dir=app)

    assert [r["clients_rejected"] for r in summary["rounds"]] == [5, 5]
    assert [r["clients_trained"] for r in summary["rounds"]] == [1, 1]
    reasons = {e["client"]: e["reason"] for e in _events(tmp_path / "run") if e["event"] == "client-rejected"}
    assert reasons["1"] == "num-examples 1000000000000 is outside [1, 100000] (max-examples-per-client)"
    assert reasons["2"] == "num-examples nan is not a whole number"
    assert reasons["3"] == "num-examples inf is not a whole number"
    assert reasons["4"] == "num-examples -3 is outside [1, 100000] (max-examples-per-client)"
    assert reasons["5"] == "num-examples 0 is outside [1, 100000] (max-examples-per-client)"
    adapter = load_file(str(tmp_path / "run" / "global_adapter" / "adapter_model.safetensors"))
    assert all(np.isfinite(v).all() for v in adapter.values())
    assert sorted(summary["per_client"]["final_round"]) == [str(i) for i in range(6)]


def _crash(marker: str) -> list[int]:
    """SIGKILL every process whose environment holds ``marker``: the server machine goes down.

    That is the CLI, `flwr run`, the SuperLink and the simulation that runs the ServerApp.
    """
    killed = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (proc / "environ").read_bytes() and int(proc.name) != os.getpid():
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return killed


def _adapter(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "global_adapter" / "adapter_model.safetensors"))


@pytest.mark.federation
def test_server_killed_mid_run_resumes_to_the_same_global_adapter(tmp_path):
    rounds, strategy = 3, "fedadam"  # FedAdam: the server's moments must survive the crash too
    reference = fedlora.run(**TINY_FEDERATION, rounds=rounds, strategy=strategy, out=tmp_path / "reference")

    # The crashed run's own TMPDIR marks its processes (short: Ray puts sockets under it).
    run, tmp = tmp_path / "crashed", Path(tempfile.mkdtemp(prefix="fl-"))
    overrides = " ".join(f"{k}={str(v).lower()}" for k, v in TINY_FLAT.items())
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli", "simulate", "--clients", "3", "--rounds", str(rounds)]
        + ["--strategy", strategy, "--out", str(run), "--run-config", overrides],
        env={**os.environ, "TMPDIR": str(tmp)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoint" / "server.safetensors").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the run ended before round 1: {proc.communicate()[1][-2000:]}")
            time.sleep(0.1)
        assert proc.pid in _crash(f"TMPDIR={tmp}")  # right after round 1's checkpoint
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == -signal.SIGKILL and not (run / "summary.json").exists()

    with pytest.raises(ConfigError, match="lora-rank: the resumed run has 4, its checkpoint 8"):
        fedlora.run(**TINY_FEDERATION, rounds=rounds, strategy=strategy, out=run, resume=True, lora_rank=4)
    resumed = fedlora.resume(run)  # the run's own config.json, as `fedlora resume RUN_DIR` does

    assert [r["round"] for r in resumed.summary["rounds"]] == list(range(1, rounds + 1))
    events = _events(run)
    assert [e["from_round"] for e in events if e["event"] == "resume"] in ([1], [2])
    # Same seed, same data, same client order: the same global adapter up to float rounding
    # (the tolerance is far below what one round changes, checked below).
    ours, theirs = _adapter(run), _adapter(reference.out_dir)
    worst = max(float(np.abs(ours[k] - theirs[k]).max()) for k in theirs)
    assert worst < 1e-6
    first = load_file(str(reference.out_dir / "rounds" / "round-001" / "adapter_model.safetensors"))
    assert max(float(np.abs(first[k] - theirs[k]).max()) for k in theirs) > 1e-3
    # Every client's personal state survived on its disk: trained in all rounds, not only after the crash.
    for client in resumed.summary["per_client"]["final_round"].values():
        assert client["personal_rounds"] >= rounds


def _processes_with(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (proc / "environ").read_bytes() and int(proc.name) != os.getpid():
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.federation
def test_sigint_stops_every_process_of_the_run_and_leaves_it_resumable(tmp_path):
    # Prepare: a run of 4 rounds whose every process carries a marker in its environment.
    marker = f"FEDLORA_TEST_RUN={os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    out = tmp_path / "run"
    overrides = " ".join(f"{k}={v}" for k, v in TINY_FLAT.items())
    command = [sys.executable, "-m", "fedlora.cli", "simulate", "--clients", "3", "--rounds", "4"]
    command += ["--out", str(out), "--run-config", overrides]
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A command typed at a terminal: the suite itself may run in the background, where
        # SIGINT is ignored and every child would inherit that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (out / "checkpoint").exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    assert (out / "checkpoint").exists(), "the run never finished a round"

    # Execute: Ctrl-C, as `kill -INT` on the command alone (its children get no signal).
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)

    # Assert: exit 130, one line on how to resume, no process of the run left, resumable.
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("fedlora: interrupted: the run in") and f"fedlora resume {out}" in last
    deadline = time.monotonic() + 20
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in _processes_with(marker)}
    assert left == {}
    assert not (out / "summary.json").exists()
    resumed = fedlora.resume(out)
    assert [r["round"] for r in resumed.rounds] == [1, 2, 3, 4]


@pytest.mark.federation
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_is_reported_as_a_full_disk(tmp_path):
    # The summary is written through a temporary file: make that file a full device.
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json.tmp").symlink_to("/dev/full")
    with pytest.raises(fedlora.FedloraError) as failed:
        fedlora.run(**TINY_FEDERATION, rounds=1, out=out)
    assert "the federation did not finish: OSError: [Errno 28] No space left on device" in str(failed.value)
