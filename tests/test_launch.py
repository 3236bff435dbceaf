import tomllib

import pytest

from fedlora.config import RunConfig
from fedlora.launch import read_events, write_app


def test_progress_reader_reads_only_what_is_new_and_waits_for_a_line_being_written(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_events(path, 0) == ([], 0)  # not written yet
    done = '{"event": "start"}\n{"event": "round", "round": 1}\n'
    path.write_text(done + '{"event": "rou')
    events, seen = read_events(path, 0)
    assert [e["event"] for e in events] == ["start", "round"] and seen == len(done)
    # What was read is never read again: spoil it, and only the new line comes back.
    path.write_text("x" * len(done) + '{"event": "round", "round": 2}\n')
    events, seen = read_events(path, seen)
    assert events == [{"event": "round", "round": 2}] and seen == path.stat().st_size
    assert read_events(path, seen) == ([], seen)


def test_generated_app_points_at_fedlora_and_lists_every_key(tmp_path):
    cfg = RunConfig().replace(lora_rank=4)
    project = tomllib.loads((write_app(tmp_path, cfg) / "pyproject.toml").read_text())
    app = project["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedlora.server_app:app", "clientapp": "fedlora.client_app:app"}
    assert app["config"] == cfg.to_flat()


def test_sessions_use_their_own_home_and_ports(tmp_path):
    from fedlora.launch import FlowerSession

    one, two = FlowerSession(tmp_path / "a"), FlowerSession(tmp_path / "b")
    assert one.env()["FLWR_HOME"] == str(tmp_path / "a" / "flwr-home")
    assert one.http_port != one.control_port
    assert {one.http_port, one.control_port}.isdisjoint({two.http_port, two.control_port})
    assert one.env()["FEDLORA_RUNS_ROOT"] == str(tmp_path / "a" / "runs")  # the ServerApp's only runs folder
    assert set(one.env()) == {
        "FEDLORA_RUNS_ROOT",
        "FLWR_HOME",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT",
        "FLWR_LOCAL_CONTROL_API_PORT",
    }


def _session_processes(home) -> dict[int, str]:
    """The processes carrying a session's FLWR_HOME, by pid: their command lines."""
    from pathlib import Path

    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if f"FLWR_HOME={home}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


@pytest.mark.federation
def test_runs_in_a_session_share_its_ray_and_nothing_outlives_the_session(tmp_path):
    from helpers import TINY_FEDERATION

    import fedlora

    with fedlora.session() as session:
        # The session's Ray starts with its first run: nothing runs before.
        assert session.ray_owned and _session_processes(session.home) == {}
        first = fedlora.run(**TINY_FEDERATION, rounds=1, out=tmp_path / "a", progress=False)
        assert session.ray().startswith("127.0.0.1:")
        heads = {pid for pid, cmd in _session_processes(session.home).items() if "gcs_server" in cmd}
        assert len(heads) == 1
        second = fedlora.run(**TINY_FEDERATION, rounds=1, seed=1, out=tmp_path / "b", progress=False)
        # The same Ray served both runs: its head process is still the one the session started.
        assert {pid for pid, cmd in _session_processes(session.home).items() if "gcs_server" in cmd} == heads
    assert [r["round"] for r in first.rounds] == [1] == [r["round"] for r in second.rounds]
    assert first.seed == 0 and second.seed == 1 and first.out_dir != second.out_dir
    assert _session_processes(session.home) == {}
