"""Real federations through `flwr run` (tiny model), and the CLI's early errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import session_processes, simulate_cli
from peft import PeftModel

from fedlora.config import RunConfig
from fedlora.launch import flower_session, simulate
from fedlora.models import load_base

ROOT = Path(__file__).resolve().parents[1]
TINY = "model=tiny-bert max-length=16 local-steps=2 personal-steps=1 batch-size=8"


def _flower_processes() -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "flower-superlink" in line or "flower-superexec" in line]


@pytest.mark.slow
def test_cli_simulate_runs_a_federation_on_the_bundled_corpus(tmp_path, warm):
    before = _flower_processes()
    out = tmp_path / "run"
    # Without --backend, the command joins the suite's warm session ($FEDLORA_SESSION); on
    # Ray: the SIGINT test runs this command, the Python API's runs here below.
    proc = simulate_cli("--clients", "4", "--rounds", "2", "--out", str(out), "--run-config", TINY)
    assert "personalized (global + personal)" in proc.stdout and "local-only" in proc.stdout
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["clients_trained"] == 4 and r["clients_failed"] == 0 for r in summary["rounds"])
    per_client = summary["rounds"][0]["bytes_up"] / 4
    assert summary["final"]["bytes_up_per_client_round"] == per_client
    assert summary["final"]["full_model_bytes"] / per_client > 250
    assert set(summary["per_client"]["local_only_accuracy"]) == {"0", "1", "2", "3"}
    for key in (
        "global_accuracy",
        "personalized_accuracy",
        "personalized_accuracy_worst10",
        "local_only_accuracy",
    ):
        assert 0.0 <= summary["final"][key] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "tiny-bert" and config["num-server-rounds"] == 2
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Four clients: one holding over a quarter of a round is capped at 1/4 (max-client-weight-share).
    capped = [e for e in events if e["event"] == "weight-capped"]
    assert all(e["weight"] < e["claimed"] for e in capped)
    steps = [e["event"] for e in events if e["event"] != "weight-capped"]
    assert steps == ["start", "round", "round", "local-only", "done"]

    # The final global adapter is a standard PEFT folder, and equals the last round's checkpoint.
    assert (out / "rounds" / "round-001" / "adapter_model.safetensors").exists()
    base, _ = load_base(RunConfig.from_flat({"model": "tiny-bert"}).model, 5, seed=0)
    stock = PeftModel.from_pretrained(base, str(out / "global_adapter"))
    from safetensors.torch import load_file

    last = load_file(str(out / "rounds" / "round-002" / "adapter_model.safetensors"))
    final = load_file(str(out / "global_adapter" / "adapter_model.safetensors"))
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in last)
    assert any("lora_B" in n for n, _ in stock.named_parameters())
    # No Flower process is left but the session's own SuperLink and SuperExec.
    ours = session_processes(warm.home)
    assert [p for p in _flower_processes() if p not in before and int(p.split()[0]) not in ours] == []


@pytest.mark.slow
def test_flwr_run_of_the_repository_app_with_a_jsonl_folder(tmp_path, jsonl_dir):
    cfg = RunConfig.from_flat(
        {
            "model": "tiny-bert",
            "max-length": 16,
            "local-steps": 1,
            "personal-steps": 1,
            "num-server-rounds": 1,
            "local-only-baseline": False,
            "data-dir": str(jsonl_dir),
        }
    )
    with flower_session(warm_ray=True) as session:
        mine = str(session.home)  # this session's SuperLink logs under its private home
        assert session.ray_owned and session_processes(session.home) == {}  # Ray starts with the first run
        summary = simulate(cfg, num_clients=3, out_dir=tmp_path / "run", app_dir=ROOT, session=session)
        # The session keeps its SuperLink and its Ray for the next run.
        assert [p for p in _flower_processes() if mine in p]
        heads = {pid for pid, cmd in session_processes(session.home).items() if "gcs_server" in cmd}
        assert len(heads) == 1
        # A second run on the same SuperLink, with a different strategy and two of the clients.
        other = simulate(
            cfg.replace(strategy="ffa-lora"),
            num_clients=2,
            out_dir=tmp_path / "two",
            app_dir=ROOT,
            session=session,
        )
        assert {pid for pid, cmd in session_processes(session.home).items() if "gcs_server" in cmd} == heads
    assert not [p for p in _flower_processes() if mine in p]
    assert session_processes(session.home) == {}  # nothing the session started outlives it
    assert summary["rounds"][0]["clients_trained"] == 3
    assert summary["labels"] == ["cooking", "music", "sport"]
    assert summary["final"]["local_only_accuracy"] is None
    assert other["strategy"] == "ffa-lora" and other["rounds"][0]["clients_trained"] == 2


def _cli_error(*args: str) -> str:
    """``fedlora simulate ARGS`` as a command: exit status 2 and one line on stderr, returned."""
    proc = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "simulate", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.federation
def test_cli_bad_input_stops_before_training_with_one_line(tmp_path, jsonl_dir, capsys):
    from fedlora.cli import main

    def error_of(*args: str) -> str:  # the same entry point in this process: no interpreter start-up
        capsys.readouterr()
        assert main(["simulate", *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    out = str(tmp_path / "never")
    assert (
        _cli_error("--out", out, "--run-config", "lora-rank=0")
        == "fedlora: error: lora-rank: must be a positive integer, got 0"
    )
    assert error_of("--out", out, "--run-config", "partitioner=zipf").startswith(
        "fedlora: error: partitioner: must be one of dirichlet, iid, natural"
    )
    assert error_of("--out", out, "--run-config", "model=no-such-model").startswith(
        "fedlora: error: model: 'no-such-model' is not a bundled model"
    )
    assert error_of("--out", out, "--data", str(tmp_path / "missing")).startswith(
        "fedlora: error: data-dir: folder"
    )
    assert error_of("--out", out, "--clients", "3000").startswith(
        "fedlora: error: clients: 3000 clients need at least"
    )
    # Privacy settings the run cannot honour stop here too, before any training.
    assert error_of("--out", out, "--strategy", "krum", "--run-config", "secure-aggregation=true").startswith(
        "fedlora: error: secure-aggregation: the server sees only the sum of the uploads, which strategy"
    )
    assert error_of("--out", out, "--run-config", "dp-delta=1.5").startswith(
        "fedlora: error: dp-delta: must be"
    )
    assert error_of("--out", out, "--run-config", "dp-target-epsilon=3 dp-secure-mode=true").startswith(
        "fedlora: error: dp-secure-mode: needs the package torchcsprng"
    )
    (jsonl_dir / "client-2" / "train.jsonl").unlink()
    assert error_of("--out", out, "--data", str(jsonl_dir)).endswith("client-2' has no train.jsonl")
    assert not Path(out).exists()
