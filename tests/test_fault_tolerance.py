"""Faults in a real federation: malformed uploads, and a server killed mid-run then resumed."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_client
from helpers import TINY_FEDERATION
from safetensors.numpy import load_file

import fedlora
from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError
from fedlora.data.sources import load_corpus
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


def _partition(name: str) -> int:
    # Results name these clients by their folders: client-000, client-001, ...
    return int(name.rsplit("-", 1)[1])


def _bbc_clients(root: Path, num: int) -> Path:
    """``num`` client folders of real BBC News text; every client holds client 0's or client 1's."""
    corpus = load_corpus("bbc-news")
    order = random.Random(0).sample(range(len(corpus.texts)), 120)
    rows = [{"text": corpus.texts[i][:300], "label": corpus.label_names[corpus.labels[i]]} for i in order]
    for i in range(num):
        own = rows[60 * (i % 2) : 60 * (i % 2) + 60]
        write_client(root / f"client-{i:03d}", own[:45], own[45:])
    return root


@pytest.mark.federation
def test_no_reply_ends_the_run_and_no_client_takes_the_global_adapter_by_default(tmp_path, warm):
    # Prepare: clients 0 and 1 behave; 2-18 each send a named attack (tests/hostile_client.py),
    # 19-70 a generated invalid reply to every message; the server runs with its defaults, in
    # the suite's warm session (its app, with the hostile ClientApp, is the run's own).
    num = 71
    app = write_app(tmp_path / "app", RunConfig())
    pyproject = app / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace("fedlora.client_app:app", "hostile_client:app"))
    shutil.copy(TESTS / "hostile_client.py", app / "hostile_client.py")
    flat = {**TINY_FLAT, "num-server-rounds": 2, "min-reply-fraction": 0.0, "fraction-evaluate": 1.0}

    # Execute
    attacked = simulate(
        RunConfig.from_flat({**flat, "data-dir": str(_bbc_clients(tmp_path / "data", num))}),
        num_clients=num,
        out_dir=tmp_path / "attacked",
        app_dir=app,
    )

    # Assert: every named attack was rejected by name, or capped; the run completed.
    events = _events(tmp_path / "attacked")
    rejected = [e for e in events if e["event"] == "client-rejected"]
    evaluate = {e["node"]: e["reason"] for e in rejected if e["reply"] == "evaluate"}
    node_of = {e["client"]: e["node"] for e in events if e["event"] == "weight-capped"}
    reasons = {pid: [] for pid in range(2, 19)}
    for e in rejected:
        if e["client"].startswith("client-") and e["reply"] == "train":
            reasons.setdefault(_partition(e["client"]), []).append(e["reason"])
    expected = {
        2: "exceeds 10 x the round's median",
        4: "is <U1 (numpy.ndarray), expected float32",
        5: "unexpected metric 'my-metric'",
        6: "is float64 (numpy.ndarray), expected float32",
        7: "is int8 (numpy.ndarray), expected float32",
        8: "holds NaN or Inf",
        9: "missing tensor",
        10: "unexpected tensor 'classifier.extra.weight'",
        11: "has shape (16,",
        12: "exceeds 10 x the round's median",
        13: "metric 'num-examples' is 1000000000000.0, outside",
        14: "metric 'num-examples' is NaN",
        15: "metric 'num-examples' is inf, outside",
        16: "metric 'num-examples' is -3.0, outside",
        17: "num-examples 0 is outside [1, 100000]",
    }
    for pid, reason in expected.items():
        assert len(reasons[pid]) == 2 and all(reason in r for r in reasons[pid]), (pid, reasons[pid])
    # Evaluate replies: accuracy 1000, an extra key, and a stolen partition id are rejected; the
    # replies naming partition inf and claiming inf examples are named by node.
    assert any("metric 'accuracy-global' is 1000.0, outside [0, 1]" in r for r in evaluate.values())
    assert any("metric 'partition-id' is inf" in r for r in evaluate.values())
    assert any("metric 'num-examples' is inf" in r for r in evaluate.values())
    assert any("partition-id 0 is node" in r for r in evaluate.values())
    # Clients 0 and 1, the claimant, and client 18 (which attacks only its evaluate replies).
    assert all(r["clients_trained"] == 4 for r in attacked["rounds"])
    # The 100,000-example claim weighs a quarter of its round (of four clients: the 0.2 cap is
    # raised to 1/4), not 99.9%; the three others hold 45 examples each.
    assert set(node_of) == {"client-003"}
    capped = [e for e in events if e["event"] == "weight-capped"]
    assert [(e["claimed"], e["weight"]) for e in capped] == [(100_000, 0.25 * (100_000 + 3 * 45))] * 2
    # 52 clients x 2 rounds x 2 messages = 208 generated replies, every one rejected; with the
    # named train (15 clients) and evaluate (5) attacks of both rounds, 248 rejections in all.
    assert len(rejected) == 208 + 2 * 15 + 2 * 5
    final = attacked["per_client"]["final_round"]
    assert sorted(final, key=_partition) == [f"client-{i:03d}" for i in (0, 1, 2, 3, *range(8, 18))]
    assert [final[f"client-{i:03d}"]["partition"] for i in (0, 1, 2)] == [0, 1, 2]
    assert not any(e["client"] in ("client-000", "client-001") for e in rejected)
    # The global adapter is finite and of an honest size: its largest weight was 0.19 here, where
    # one accepted 1e30 upload would make it 2.5e29 (the honest clients' accuracy against a clean
    # run, over seeds and a pretrained model: simulations/bench_attacks.py).
    adapter = load_file(str(tmp_path / "attacked" / "global_adapter" / "adapter_model.safetensors"))
    assert all(np.isfinite(v).all() for v in adapter.values())
    assert max(float(np.abs(v).max()) for v in adapter.values()) < 1.0
    # Every recorded accuracy is a share: no reply could push one out of [0, 1].
    assert all(0 <= c["global_accuracy"] <= 1 for c in attacked["per_client"]["final_round"].values())


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
def test_server_killed_mid_run_resumes_to_the_same_global_adapter(tmp_path, warm):
    rounds, strategy = 3, "fedadam"  # FedAdam: the server's moments must survive the crash too
    reference = fedlora.run(**TINY_FEDERATION, rounds=rounds, strategy=strategy, out=tmp_path / "reference")

    # The crashed run's own TMPDIR marks its processes (short: Ray puts sockets under it); it
    # runs on Ray, outside the suite's session.
    run, tmp = tmp_path / "crashed", Path(tempfile.mkdtemp(prefix="fl-"))
    env = {k: v for k, v in os.environ.items() if k != "FEDLORA_SESSION"}
    overrides = " ".join(f"{k}={str(v).lower()}" for k, v in TINY_FLAT.items())
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli", "simulate", "--clients", "3", "--rounds", str(rounds)]
        + ["--strategy", strategy, "--out", str(run), "--run-config", overrides],
        env={**env, "TMPDIR": str(tmp)},
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
    # (the tolerance is far below what one round changes, checked below). The reference and
    # the resumed rounds ran in the suite's warm session, the crashed round 1 on Ray actors.
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
def test_sigint_stops_every_process_of_the_run_and_leaves_it_resumable(tmp_path, warm):
    # Prepare: a run of 4 rounds on Ray (outside the suite's session) whose every process
    # carries a marker in its environment.
    marker = f"FEDLORA_TEST_RUN={os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    env.pop("FEDLORA_SESSION")
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
    # Ray's workers end on their own once their raylet is gone: seconds when idle, longer on
    # a loaded machine (a worker was seen still exiting after 20 s at load average 5 on 2 cores).
    deadline = time.monotonic() + 60
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in _processes_with(marker)}
    assert left == {}
    assert not (out / "summary.json").exists()
    resumed = fedlora.resume(out)  # in the suite's warm session
    assert [r["round"] for r in resumed.rounds] == [1, 2, 3, 4]


@pytest.mark.federation
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_full_disk_is_reported_as_a_full_disk(tmp_path, warm):
    # The summary is written through a temporary file: make that file a full device.
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json.tmp").symlink_to("/dev/full")
    with pytest.raises(fedlora.FedloraError) as failed:
        fedlora.run(**TINY_FEDERATION, rounds=1, out=out)
    assert "the federation did not finish: OSError: [Errno 28] No space left on device" in str(failed.value)
