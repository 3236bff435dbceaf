"""Bad input stops before Flower starts, with one line; valid data is accepted; results are kept."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest
from conftest import write_client
from flwr.app import ConfigRecord, Context, Message, RecordDict
from helpers import as_server

from fedlora import cli
from fedlora.client.state import save_state, state_path
from fedlora.client_app import app
from fedlora.config import RunConfig
from fedlora.core import keys
from fedlora.core.errors import ConfigError, DataError, ModelError
from fedlora.data.jsonl import read_jsonl
from fedlora.launch import last_error, preflight
from fedlora.lora.adapters import to_record
from fedlora.server.runs_root import RUNS_ROOT_ENV, run_directory

TINY = "model=tiny-bert max-length=16 local-steps=2 personal-steps=1 batch-size=8"


def _one_line_error(capsys, *args: str) -> str:
    assert cli.main(list(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# --- JSONL that is valid must be read ---------------------------------------------------


def test_a_unicode_line_separator_inside_a_text_is_text(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps({"text": "first\u2028still the first", "label": "a"}, ensure_ascii=False)
        + "\n"
        + json.dumps({"text": "second\u2029too", "label": "b"}, ensure_ascii=False)
        + "\n",
        encoding="utf-8",
    )
    records = read_jsonl(path, task="classification")
    assert [r["text"] for r in records] == ["first\u2028still the first", "second\u2029too"]


def test_a_byte_order_mark_and_windows_line_ends_are_accepted(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": "x"}\r\n{"text": "b", "label": "y"}\r\n')
    assert read_jsonl(path, task="classification") == [
        {"text": "a", "label": "x"},
        {"text": "b", "label": "y"},
    ]


def test_empty_texts_are_dropped_and_counted_in_the_log(tmp_path, caplog):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "kept"}\n{"text": ""}\n{"text": "  \\t "}\n\n')
    with caplog.at_level(logging.WARNING):
        assert read_jsonl(path, task="causal-lm") == [{"text": "kept"}]
    assert "dropped 2 records with an empty text" in caplog.text


def test_labels_of_any_json_type_are_one_label_each(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 1.0}, {"text": "c", "label": "1"}]
    rows += [{"text": "d", "label": True}, {"text": "e", "label": 2.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["label"] for r in read_jsonl(path, task="classification")] == ["1", "1", "1", "true", "2.5"]
    path.write_text('{"text": "a", "label": null}\n')
    with pytest.raises(DataError, match='train.jsonl:1: expected a "label" field'):
        read_jsonl(path, task="classification")


# --- values that mean nothing are refused before anything runs ----------------------------


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"dp-noise-multiplier": "nan"}, "dp-noise-multiplier: must be a finite number, got 'nan'"),
        ({"learning-rate": float("inf")}, "learning-rate: must be a finite number, got inf"),
        ({"max-update-norm": "nan"}, "max-update-norm: must be a number (inf: no bound), got 'nan'"),
        ({"round-timeout": "inf"}, "round-timeout: must be a finite number, got 'inf'"),
        ({"lora-rank": 100000}, "lora-rank: must be an integer in [1, 1024], got 100000"),
        ({"local-steps": 10**9}, "local-steps: must be an integer in [1, 100000], got 1000000000"),
        ({"max-length": 10**6}, "max-length: must be an integer in [4, 32768], got 1000000"),
        ({"max-examples-per-client": 0}, "max-examples-per-client: must be a positive integer, got 0"),
    ],
)
def test_meaningless_values_are_refused_naming_the_key(flat, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flat(flat)
    assert str(err.value) == message


def test_inf_still_means_no_bound_where_documented():
    cfg = RunConfig.from_flat({"max-update-norm": "inf", "dp-epsilon-budget": "inf"})
    assert cfg.federation.max_update_norm == float("inf")


def test_a_rank_larger_than_the_model_s_layers_is_refused_before_training(tmp_path, jsonl_dir):
    cfg = RunConfig.from_flat({"model": "tiny-bert", "lora-rank": 64, "data-dir": str(jsonl_dir)})
    with pytest.raises(ModelError, match=r"^lora-rank: must be at most 32 for model 'tiny-bert'"):
        preflight(cfg, 3)


def test_one_label_is_refused_before_flower_starts(tmp_path):
    for i in range(2):
        rows = [{"text": f"t {n}", "label": "only"} for n in range(4)]
        write_client(tmp_path / "data" / f"c{i}", rows, rows)
    cfg = RunConfig.from_flat({"model": "tiny-bert", "data-dir": str(tmp_path / "data")})
    with pytest.raises(DataError, match=r"^labels: classification needs at least 2 labels, the data has 1"):
        preflight(cfg, 2)


def test_the_command_line_reports_bad_input_in_one_line(tmp_path, capsys, jsonl_dir):
    out = str(tmp_path / "never")
    assert _one_line_error(capsys, "simulate", "--out", out, "--run-config", "num-server-rounds=abc") == (
        "fedlora: error: num-server-rounds: must be an integer, got 'abc'"
    )
    assert _one_line_error(
        capsys, "simulate", "--out", out, "--data", str(jsonl_dir), "--cpus-per-client", "0"
    ) == ("fedlora: error: cpus-per-client: must be a positive number, got 0.0")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = _one_line_error(
        capsys, "simulate", "--out", str(blocker / "run"), "--data", str(jsonl_dir), "--run-config", TINY
    )
    assert line.startswith(f"fedlora: error: out: cannot create {blocker / 'run'}")
    assert not Path(out).exists()


def test_a_data_folder_of_one_client_or_a_run_inside_the_data_is_refused(tmp_path, capsys, jsonl_dir):
    # train.jsonl and test.jsonl directly in --data: one device's data, not a federation.
    device = jsonl_dir / "client-0"
    line = _one_line_error(capsys, "simulate", "--data", str(device), "--out", str(tmp_path / "r"))
    assert line == (
        f"fedlora: error: data-dir: {device} holds train.jsonl and test.jsonl itself, one client's data; "
        "a simulation needs one subfolder per client (DIR/<client>/train.jsonl, DIR/<client>/test.jsonl)"
    )
    inside = jsonl_dir / "runs" / "first"
    line = _one_line_error(capsys, "simulate", "--data", str(jsonl_dir), "--out", str(inside))
    assert line == (
        f"fedlora: error: out: {inside} is inside the data folder {jsonl_dir}, where the next run would "
        "read it as a client; choose a folder outside it"
    )
    assert not (jsonl_dir / "runs").exists() and not (tmp_path / "r").exists()


def test_a_label_only_in_test_data_is_refused_naming_file_and_line(tmp_path):
    for i in range(2):
        rows = [{"text": f"t {n}", "label": ["billing", "shipping"][n % 2]} for n in range(4)]
        write_client(tmp_path / "data" / f"c{i}", rows, rows)
    test = tmp_path / "data" / "c1" / "test.jsonl"
    test.write_text(test.read_text() + json.dumps({"text": "refund please", "label": "Billing"}) + "\n")
    cfg = RunConfig.from_flat({"model": "tiny-bert", "data-dir": str(tmp_path / "data")})
    with pytest.raises(DataError) as err:
        preflight(cfg, 2)
    assert str(err.value) == (
        f"{test}:5: label 'Billing' is in test data only, so no client can learn it (training has "
        "'billing': labels are case-sensitive); fix the label, or give every class with labels=... to keep it"
    )


def test_resume_of_a_corrupt_config_is_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{not json")
    assert _one_line_error(capsys, "resume", str(tmp_path / "run")) == (
        f"fedlora: error: config.json: {tmp_path / 'run' / 'config.json'} cannot be read as a run config "
        "(JSONDecodeError)"
    )


# --- earlier results are never lost ----------------------------------------------------------


def _finished_run(out: Path) -> dict[str, str]:
    files = {"summary.json": '{"final": {}}', "metrics.jsonl": '{"event": "done"}\n', "config.json": "{}"}
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    (out / "clients").mkdir()
    (out / "clients" / "client-0.state").write_text("personal")
    return {**files, "clients/client-0.state": "personal"}


def test_an_out_folder_with_a_finished_run_is_refused_and_left_as_it_was(tmp_path, capsys, jsonl_dir):
    out = tmp_path / "run"
    before = _finished_run(out)
    args = ("simulate", "--out", str(out), "--data", str(jsonl_dir), "--run-config", TINY)
    line = _one_line_error(capsys, *args)
    assert line.startswith(f"fedlora: error: out: {out} holds a finished run; choose another folder")
    assert {name: (out / name).read_text() for name in before} == before


def test_an_out_folder_with_a_resumable_run_is_refused_too(tmp_path, capsys, jsonl_dir):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "server.safetensors").write_bytes(b"state")
    args = ("simulate", "--out", str(out), "--data", str(jsonl_dir), "--run-config", TINY)
    line = _one_line_error(capsys, *args)
    assert line.startswith(f"fedlora: error: out: {out} holds an unfinished run; go on with `fedlora")
    assert (out / "checkpoint" / "server.safetensors").read_bytes() == b"state"


# --- what a run config may name on the server ------------------------------------------------


@pytest.mark.parametrize(
    "out_dir",
    ["../outside", "a/../../outside", "/etc", "~", ".", "", "runs/../.."],
)
def test_a_run_config_cannot_name_a_folder_outside_the_runs_root(tmp_path, monkeypatch, out_dir):
    root = tmp_path / "runs"
    monkeypatch.setenv(RUNS_ROOT_ENV, str(root))
    if out_dir == "":  # empty: a fresh folder inside the root, never the root itself
        assert run_directory(out_dir).parent == root.resolve()
        return
    with pytest.raises(ConfigError, match=r"^out-dir: .* is not a folder inside the server's runs folder"):
        run_directory(out_dir.replace("/etc", str(tmp_path / "etc")))


def test_folders_inside_the_runs_root_by_name_or_absolute_path(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    (root / "linked").parent.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (root / "linked").symlink_to(tmp_path / "elsewhere")  # the server owner's own link is followed
    monkeypatch.setenv(RUNS_ROOT_ENV, str(root))
    assert run_directory("first") == root.resolve() / "first"
    assert run_directory("a/b/../c") == root.resolve() / "a" / "c"
    assert run_directory(str(root / "second")) == root.resolve() / "second"
    assert run_directory("linked") == (tmp_path / "elsewhere").resolve()
    with pytest.raises(ConfigError, match="not a folder inside"):
        run_directory("linked/../../outside")
    monkeypatch.delenv(RUNS_ROOT_ENV)
    monkeypatch.chdir(tmp_path)  # without the variable: the working directory, default runs/<timestamp>
    assert run_directory("").parent == tmp_path.resolve() / "runs"
    with pytest.raises(ConfigError, match="not a folder inside"):
        run_directory(str(tmp_path.parent))


def test_the_server_names_the_real_error_of_a_failed_run(tmp_path):
    # A full disk: Flower's traceback, then fedlora's line, then warnings that mention "error".
    log = tmp_path / "flwr.log"
    log.write_text(
        "Traceback (most recent call last):\n"
        "OSError: [Errno 28] No space left on device\n"
        "fedlora: error: OSError: [Errno 28] No space left on device\n"
        "FutureWarning: ray error reporting will change in a future release\n"
    )
    assert last_error(log) == "OSError: [Errno 28] No space left on device"


# --- what a server may ask of a device -------------------------------------------------------


def _device_context(tmp_path: Path, run_config: dict) -> Context:
    device = tmp_path / "device"
    rows = [{"text": f"goal {n}", "label": "sport"} for n in range(4)]
    rows += [{"text": f"song {n}", "label": "music"} for n in range(4)]
    write_client(device, rows, rows)
    return Context(
        run_id=1,
        node_id=7,
        state=RecordDict(),
        run_config=run_config,
        node_config={keys.NODE_DATA_DIR: str(device)},
    )


def test_a_device_ignores_paths_that_the_run_config_names(tmp_path, tiny_cfg):
    wire, state = tmp_path / "server-chose-this.log", tmp_path / "server-chose-this-dir"
    run_config = tiny_cfg.replace(
        labels="music,sport", audit_wire_log=str(wire), client_state_dir=str(state)
    ).to_flat()
    context = _device_context(tmp_path, run_config)
    as_server()
    message = Message(
        content=RecordDict({keys.ARRAYS: to_record({}), keys.CONFIG: ConfigRecord({keys.C_SERVER_ROUND: 1})}),
        dst_node_id=7,
        message_type="train",
    )
    app(message, context)
    assert not wire.exists() and not state.exists()
    assert state_path(context) is None  # no state-dir of its own: state stays in memory


def test_a_device_writes_its_wire_log_where_its_own_node_config_says(tmp_path, tiny_cfg):
    own = tmp_path / "own-wire.log"
    context = _device_context(tmp_path, tiny_cfg.replace(labels="music,sport").to_flat())
    context.node_config[keys.NODE_WIRE_LOG] = str(own)
    as_server()
    message = Message(
        content=RecordDict({keys.ARRAYS: to_record({}), keys.CONFIG: ConfigRecord({keys.C_SERVER_ROUND: 1})}),
        dst_node_id=7,
        message_type="train",
    )
    app(message, context)
    assert own.exists() and json.loads(own.read_text().splitlines()[0])["node"] == 7


def test_state_files_are_readable_by_their_owner_only(tmp_path):
    context = Context(
        run_id=1,
        node_id=1,
        state=RecordDict({keys.S_PERSONAL_ROUNDS: ConfigRecord({"rounds": 1})}),
        run_config={},
        node_config={keys.NODE_STATE_DIR: str(tmp_path / "state")},
    )
    path = state_path(context)
    assert path is not None
    save_state(context, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


# --- chat data -------------------------------------------------------------------------


def _chat_clients(root, bad=None):
    talk = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    for i in range(2):
        rows = [talk] * 4 + ([bad] if bad is not None and i == 1 else [])
        write_client(root / f"c{i}", rows, [talk])
    return str(root)


@pytest.mark.parametrize(
    ("extra", "bad", "message"),
    [
        (
            "chat-template=auto",
            None,
            "chat-template: the tokenizer of model 'tiny-llama' has no chat template",
        ),
        (
            "",
            {"messages": [{"role": "user", "content": "hi"}]},
            "train.jsonl:5: the conversation has no assistant",
        ),
        ("", {"messages": [{"role": "robot", "content": "hi"}]}, "train.jsonl:5: message 1 has role 'robot'"),
        ("", {"text": "a", "messages": []}, "train.jsonl:5: a record holds both 'text' and 'messages'"),
        ("model=tiny-bert", None, "model: task 'chat' needs a causal LM"),
    ],
)
def test_bad_chat_input_stops_before_training_in_one_line(tmp_path, capsys, extra, bad, message):
    data = _chat_clients(tmp_path / "data", bad)
    config = f"task=chat model=tiny-llama chat-template=plain {extra}"
    line = _one_line_error(
        capsys,
        "simulate",
        "--clients",
        "2",
        "--data",
        data,
        "--out",
        str(tmp_path / "never"),
        "--run-config",
        config,
    )
    assert message in line
    assert not (tmp_path / "never").exists()


def test_chat_without_a_data_folder_is_refused(tmp_path, capsys):
    line = _one_line_error(
        capsys, "simulate", "--out", str(tmp_path / "never"), "--run-config", "task=chat model=tiny-llama"
    )
    assert "task: chat reads conversations or prompt-completion records from data-dir" in line
