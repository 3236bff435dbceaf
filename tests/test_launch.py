import tomllib

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


def test_a_session_refuses_a_malformed_ray_address_before_starting_anything():
    import pytest

    import fedlora
    from fedlora.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^ray-address: must be auto or HOST:PORT .* got 'not an addr'$"):
        with fedlora.session(ray_address="not an addr"):
            pass
