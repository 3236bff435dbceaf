"""A warm session (`fedlora.session(backend="warm")`): its stand-in, its backend, its runs and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import TINY_FEDERATION, as_server, session_processes, simulate_cli

import fedlora
from fedlora.core.errors import ConfigError
from fedlora.launch import session as launch_session

STAND_IN = Path(launch_session.__file__).with_name("_stand_in.py")


def test_a_session_refuses_an_unknown_backend_and_a_warm_one_on_a_ray_cluster():
    with pytest.raises(ConfigError, match=r"^backend: must be one of ray, warm, got 'fork'$"):
        with fedlora.session(backend="fork"):
            pass
    with pytest.raises(ConfigError, match=r"^backend: 'warm' runs no Ray; leave ray-address empty"):
        with fedlora.session(backend="warm", ray_address="127.0.0.1:6379"):
            pass


def test_a_warm_session_puts_its_stand_in_first_on_flowers_path(tmp_path):
    session = launch_session.FlowerSession(tmp_path, backend="warm")
    session._started.append(str(tmp_path / "warm.sock"))  # as if its warm process were up
    env = session.env()
    assert env["PATH"].split(os.pathsep)[0] == str(tmp_path / "bin")
    assert "RAY_ADDRESS" not in env and session.outlives_runs and not session.ray_owned


def test_the_stand_in_runs_flowers_own_simulation_when_no_warm_process_answers(tmp_path):
    # The "real" flwr-simulation here is a script that prints what it was given.
    real = tmp_path / "flwr-simulation"
    real.write_text('#!/bin/sh\necho real "$@"\n')
    real.chmod(0o755)
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(STAND_IN), str(tmp_path / "nobody.sock"), str(real), "--token", "t"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout == "real --token t\n"


def test_a_stand_in_that_exited_unreaped_counts_as_gone():
    # A killed stand-in stays a zombie until its SuperExec reaps it; the forked simulation
    # watching it (`warm._end_with`) must end all the same.
    from fedlora.launch.processes import alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert Path(f"/proc/{child.pid}").exists()  # not reaped yet: a zombie
    assert not alive(child.pid) and alive(os.getpid())
    child.wait()


def test_a_forked_simulation_uploads_every_log_line_before_its_result_without_waiting(monkeypatch):
    # Flower's own log uploader, with a Runtime client that records what it was sent.
    import queue

    import flwr.simulation.app as simulation_app
    from flwr.supercore.logger import start_log_uploader

    from fedlora.launch import warm

    monkeypatch.setattr(simulation_app, "flush_logs", simulation_app.flush_logs)  # undone after
    warm._flush_logs_without_waiting()
    pushed: list[str] = []

    class Runtime:
        def PushLogs(self, request):  # Flower's name
            time.sleep(0.05)  # a real upload takes a moment
            pushed.extend(request.logs)

    log_queue: queue.Queue[str | None] = queue.Queue()
    uploader = start_log_uploader(log_queue, node_id=1, run_id=1, client=Runtime())
    lines = [f"line {i}" for i in range(50)]
    for line in lines:
        log_queue.put(line)
    assert simulation_app.flush_logs(log_queue)
    # Every line was uploaded when it returned, and the uploader has ended: nothing is left
    # to wait for (Flower's own flush_logs leaves it running and sleeps a second instead).
    assert pushed == lines and not uploader.is_alive()
    simulation_app.stop_log_uploader(log_queue, uploader)  # Flower's exit still calls it: a no-op now


def test_a_forked_simulations_engine_queues_end_their_wait_when_the_run_stops(monkeypatch):
    import queue
    import threading

    from flwr.server.superlink.fleet.vce import vce_api

    from fedlora.launch import warm

    # Flower's engine, as the warm child patches it (both undone after the test).
    seen: dict[str, object] = {}

    def run_api(app_fn, backend_fn, nodes_mapping, state_factory, node_info_stores, f_stop, metrics):
        seen["queue"] = vce_api.Queue()  # as Flower's run_api makes its queues

    monkeypatch.setattr(vce_api, "run_api", run_api)
    monkeypatch.setattr(vce_api, "Queue", vce_api.Queue)
    warm._wake_on_stop()
    stop = threading.Event()
    vce_api.run_api(None, None, {}, None, {}, stop, None)
    waiting = seen["queue"]
    waiting.put("message")
    assert waiting.get(timeout=5.0) == "message"  # a queue as before while the run goes on
    with pytest.raises(queue.Empty):
        waiting.get(timeout=0.1)
    # Flower's workers wait with get(timeout=1.0), then look at the stop event: a wait that
    # outlasted the stop by this test's 30 s would be Flower's own queue.
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(queue.Empty):
        waiting.get(timeout=30.0)
    assert time.monotonic() - started < 10.0


def test_the_warm_backend_runs_each_message_on_a_copy():
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedlora.launch.warm import WarmBackend

    seen = []

    def app(message, context):
        seen.append(message)
        message.content["config"]["touched"] = 1  # a ClientApp that changes what it was given
        context.state["config"] = ConfigRecord({"calls": 1})
        return Message(RecordDict({"config": ConfigRecord({"answer": 42})}), reply_to=message)

    as_server()
    backend = WarmBackend({})
    backend.build(lambda: app)
    sent = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply, updated = backend.process_message(sent, context)
    assert (
        dict(sent.content["config"]) == {"x": 1} and seen[0] is not sent
    )  # the sender's message is untouched
    assert "config" not in context.state and dict(updated.state["config"]) == {"calls": 1}
    assert dict(reply.content["config"]) == {"answer": 42}
    assert backend.num_workers == 1 and backend.is_worker_idle()


@pytest.mark.federation
@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_a_session_command_serves_runs_of_other_processes_which_stay_independent(tmp_path, monkeypatch):
    # Prepare: `fedlora session` in a process of its own; this process joins it through the
    # variable it prints, as a notebook's kernel would.
    tiny = {**TINY_FEDERATION, "clients": 2, "rounds": 1}
    owner = subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli", "session"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        line = "-"
        while line and not line.startswith("export FEDLORA_SESSION="):
            line = owner.stdout.readline()  # "" once it has exited
        assert line, "`fedlora session` printed no export line"
        monkeypatch.setenv("FEDLORA_SESSION", line.split("=", 1)[1].strip())
        session = launch_session.joined_session()
        assert session is not None and session.backend == "warm"
        # Its warm process started with the command, before any run.
        warm = {pid for pid, cmd in session_processes(session.home).items() if "fedlora.launch.warm" in cmd}
        assert len(warm) == 1

        # Execute: a caller that connects to the warm process and never asks; a run through
        # the API; one that fails in its forked process (its summary cannot be written: a
        # full disk); then the first again through the command.
        stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stalled.connect(str(session.root / "warm.sock"))
        fedlora.run(**tiny, seed=0, out=tmp_path / "a", progress=False)
        stalled.settimeout(30)
        assert stalled.recv(1) == b""  # it was dropped after the warm process's 10 s wait
        stalled.close()
        failed = tmp_path / "full"
        failed.mkdir()
        (failed / "summary.json.tmp").symlink_to("/dev/full")
        with pytest.raises(fedlora.FedloraError, match="No space left on device"):
            fedlora.run(**tiny, seed=0, out=failed, progress=False)
        flat = {
            k.replace("_", "-"): str(v).lower() for k, v in tiny.items() if k not in ("clients", "rounds")
        }
        overrides = " ".join(f"{k}={v}" for k, v in flat.items())
        simulate_cli(
            "--clients", "2", "--rounds", "1", "--out", str(tmp_path / "c"), "--run-config", overrides
        )

        # Assert: every run was forked from the session's one warm process, and no Ray started.
        processes = session_processes(session.home)
        assert {pid for pid, cmd in processes.items() if "fedlora.launch.warm" in cmd} == warm
        assert not any(ray in cmd for cmd in processes.values() for ray in ("raylet", "gcs_server"))
    finally:
        os.killpg(owner.pid, signal.SIGTERM)
        said, _ = owner.communicate(timeout=60)
    # The command ends the session on SIGTERM (or Ctrl-C), and nothing of it is left.
    assert owner.returncode == 0 and "fedlora: session ended" in said, said
    assert session_processes(session.home) == {} and not session.root.exists()
    # What one run loads or trains never reaches the next: the same run again gives the same figures.
    first, again = (json.loads((tmp_path / run / "summary.json").read_text())["final"] for run in "ac")
    assert again == {**first, "wall_s": again["wall_s"]}
    adapter = "global_adapter/adapter_model.safetensors"
    assert (tmp_path / "a" / adapter).read_bytes() == (tmp_path / "c" / adapter).read_bytes()


def test_a_session_variable_naming_no_open_session_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDLORA_SESSION", str(tmp_path / "gone"))
    with pytest.raises(
        ConfigError, match=r"^FEDLORA_SESSION=.*/gone: no fedlora session there \(it has ended"
    ):
        with fedlora.session():
            pass
    (tmp_path / "session.json").write_text("{not json")
    monkeypatch.setenv("FEDLORA_SESSION", str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"^FEDLORA_SESSION=.*: not a fedlora session's folder \(session.json: "
    ):
        fedlora.run(**TINY_FEDERATION, out=tmp_path / "run", progress=False)
    (tmp_path / "session.json").write_text(
        json.dumps(
            {
                "http_port": 1,
                "control_port": 2,
                "ray_address": "",
                "warm_ray": False,
                "backend": "warm",
                "pid": 2**22 + 1,
            }
        )
    )
    with pytest.raises(
        ConfigError, match=r"^FEDLORA_SESSION=.*: the session has ended \(its process 4194305 is gone\)"
    ):
        with fedlora.session():
            pass


def test_a_session_folder_others_can_write_into_is_not_joined(tmp_path, monkeypatch):
    # Someone else's folder (or one they can write into) could put their own flwr-simulation
    # first on the PATH of this user's runs.
    state = {"http_port": 1, "control_port": 2, "ray_address": "", "warm_ray": False, "backend": "warm"}
    (tmp_path / "session.json").write_text(json.dumps({**state, "pid": os.getpid()}))
    tmp_path.chmod(0o777)
    monkeypatch.setenv("FEDLORA_SESSION", str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"^FEDLORA_SESSION=.*: the folder must be this user's own and private"
    ):
        with fedlora.session():
            pass
    tmp_path.chmod(0o700)
    with fedlora.session() as joined:
        assert joined.joined


def test_a_session_joins_the_named_one_only_on_the_backend_asked_for(tmp_path, monkeypatch):
    # The named session: warm, its process this one, its folder private.
    tmp_path.chmod(0o700)
    state = {"http_port": 11, "control_port": 12, "ray_address": "", "warm_ray": False, "backend": "warm"}
    (tmp_path / "session.json").write_text(json.dumps({**state, "pid": os.getpid()}))
    monkeypatch.setenv("FEDLORA_SESSION", str(tmp_path))
    for backend in (None, "warm"):
        with fedlora.session(backend=backend) as joined:
            assert joined.joined and joined.root == tmp_path.resolve()
            assert (joined.http_port, joined.control_port, joined.backend) == (11, 12, "warm")
    assert (tmp_path / "session.json").exists()  # a joined session's end removes nothing
    with fedlora.session(backend="ray") as own:  # another backend: a session of its own
        assert not own.joined and own.root != tmp_path and own.backend == "ray"


SWEEP = """
import sys
from pathlib import Path
import fedlora
tiny = {tiny!r}
ROUNDS = {rounds}
with fedlora.session(backend="warm") as session:
    Path(sys.argv[2]).write_text(str(session.home))
    fedlora.sweep(strategies=["fedavg", "fedprox"], rounds=ROUNDS, out=Path(sys.argv[1]), progress=False,
                  **tiny)
"""


@pytest.mark.federation
def test_ctrl_c_in_a_sweep_in_a_warm_session_leaves_nothing_and_a_resumable_run(tmp_path):
    # Prepare: a sweep of two 10-round runs in a warm session, in a process of its own (a
    # tiny warm round takes under a second: 4 rounds could end before the Ctrl-C lands).
    tiny = {k: v for k, v in TINY_FEDERATION.items() if k != "rounds"}
    out, home_file = tmp_path / "sweep", tmp_path / "home"
    rounds = 10
    code = textwrap.dedent(SWEEP.format(tiny=tiny, rounds=rounds))
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(out), str(home_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as at a terminal
    )
    first = out / "fedavg__auto__seed0"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (first / "checkpoint").exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.3)
    assert (first / "checkpoint").exists(), "the first run never finished a round"
    home = Path(home_file.read_text())
    assert any("fedlora.launch.warm" in cmd for cmd in session_processes(home).values())

    # Execute: Ctrl-C in the middle of the sweep's first run.
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)

    # Assert: the sweep stops with the run's one line, nothing of the session is left, the
    # interrupted run goes on from its checkpoint, and a run in a new warm session works.
    assert proc.returncode != 0 and "RunInterrupted: interrupted: the run in" in stderr, stderr
    assert f"fedlora resume {first}" in stderr
    assert session_processes(home) == {}
    assert not (first / "summary.json").exists() and not (out / "fedprox__auto__seed0").exists()
    with fedlora.session(backend="warm"):
        resumed = fedlora.resume(first, progress=False)
    assert [r["round"] for r in resumed.rounds] == list(range(1, rounds + 1))
    assert json.loads((first / "summary.json").read_text())["final"]["global_accuracy"] is not None


def test_the_command_refuses_a_warm_backend_on_a_ray_cluster_in_one_line(tmp_path, capsys):
    from fedlora.cli import main

    args = ["simulate", "--backend", "warm", "--ray-address", "127.0.0.1:6379", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    refusal = "fedlora: error: backend: 'warm' runs no Ray; leave ray-address empty, got '127.0.0.1:6379'"
    assert lines == [refusal]
    assert not (tmp_path / "r").exists()
