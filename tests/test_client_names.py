"""Clients keep their own names in results: a data folder, a role, a natural id; else a number."""

from __future__ import annotations

import json

import pytest
from conftest import write_client
from flwr.app import MetricRecord, RecordDict
from helpers import reply
from hostile_client import EVALUATE_METRICS

from fedlora.config import DataConfig, RunConfig
from fedlora.core.errors import DataError
from fedlora.data import client_names, load_client_data
from fedlora.data.shakespeare import role_lines

# The first roles of the bundled plays, in partition order (`fedlora.data.shakespeare.roles`).
FIRST_ROLES = (
    "a-midsummer-night-s-dream/BOTTOM",
    "a-midsummer-night-s-dream/DEMETRIUS",
    "a-midsummer-night-s-dream/EGEUS",
)


def test_a_data_folder_client_is_named_after_its_subfolder(jsonl_dir):
    cfg = DataConfig(data_dir=str(jsonl_dir))
    assert client_names(cfg, "classification", 3) == ("client-0", "client-1", "client-2")
    assert client_names(cfg, "classification", 2) == ("client-0", "client-1")
    with pytest.raises(
        DataError, match=r"^clients: 4 clients asked, but data-dir .* has only 3 client folders$"
    ):
        client_names(cfg, "classification", 4)


def test_a_device_s_own_folder_is_named_after_that_folder(tmp_path):
    write_client(tmp_path / "alice", [{"text": "a", "label": "x"}], [{"text": "b", "label": "x"}])
    assert client_names(DataConfig(data_dir=str(tmp_path / "alice")), "classification", 1) == ("alice",)


@pytest.mark.parametrize(("dataset", "task"), [("shakespeare", "causal-lm"), ("shakespeare-chat", "chat")])
def test_a_shakespeare_client_is_named_after_its_role(dataset, task):
    cfg = DataConfig(dataset=dataset)
    assert client_names(cfg, task, 3) == FIRST_ROLES
    assert len(client_names(cfg, task, 40)) == len(set(client_names(cfg, task, 40))) == 40


def test_a_shakespeare_name_is_the_role_whose_lines_the_client_holds():
    cfg = DataConfig(dataset="shakespeare")
    play, role = client_names(cfg, "causal-lm", 3)[1].split("/")
    client = load_client_data(cfg, "causal-lm", 1, 3)
    assert client.train_texts + client.test_texts == role_lines(play, role)


def test_more_clients_than_roles_is_refused_in_one_line():
    with pytest.raises(
        DataError, match=r"^clients: 5000 clients asked, but dataset 'shakespeare' has only \d+$"
    ):
        client_names(DataConfig(dataset="shakespeare"), "causal-lm", 5000)


@pytest.mark.parametrize("partitioner", ["dirichlet", "iid"])
def test_clients_cut_from_a_corpus_keep_their_numbers(partitioner):
    assert client_names(DataConfig(partitioner=partitioner), "classification", 4) == ("0", "1", "2", "3")


def test_an_hf_client_is_named_by_its_natural_id(tmp_path, monkeypatch):
    import datasets
    from datasets import Dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    rows = {
        "text": [f"{user} says {i}" for user in (10, 2, 33) for i in range(3)],
        "user": [10] * 3 + [2] * 3 + [33] * 3,
    }
    Dataset.from_dict(rows).save_to_disk(tmp_path / "users")
    cfg = DataConfig(dataset=f"hf:{tmp_path / 'users'}", partitioner="natural", partition_by="user")
    # Ids sort as the column's values (numbers here), and client i holds the rows of the i-th.
    assert client_names(cfg, "causal-lm", 3) == ("2", "10", "33")
    client = load_client_data(cfg, "causal-lm", 1, 3)
    assert {text.split()[0] for text in client.train_texts + client.test_texts} == {"10"}
    with pytest.raises(DataError, match=r"^clients: 4 clients asked, but hf:.* has only 3 distinct values"):
        client_names(cfg, "causal-lm", 4)
    # Without natural ids, clients are numbered and the dataset is not read.
    missing = DataConfig(dataset=f"hf:{tmp_path / 'nowhere'}", partitioner="iid")
    assert client_names(missing, "causal-lm", 2) == ("0", "1")


def _evaluation(pid: int | None, node: int, accuracy: float):
    metrics = {**EVALUATE_METRICS, "accuracy-personalized": accuracy}
    if pid is not None:
        metrics["partition-id"] = pid
    return reply(RecordDict({"metrics": MetricRecord(metrics)}), node, "evaluate")


@pytest.fixture
def named_run(tmp_path):
    """A recorded run of two simulated clients named by their data and one deployed device."""
    from fedlora.server.recorder import RunRecorder
    from fedlora.server.recording import Recorded
    from fedlora.strategies import build_strategy

    cfg = RunConfig.from_flat({"num-server-rounds": 1})
    looked_up = []

    def names():
        looked_up.append(1)
        return ("alice", "bob")

    recorder = RunRecorder(tmp_path, cfg.to_flat(), full_model_bytes=1, names=names)
    recorded = Recorded(build_strategy("fedavg", cfg), recorder)
    recorded.aggregate_evaluate(
        1, [_evaluation(1, 5, 0.75), _evaluation(None, 9, 0.5), _evaluation(0, 4, 0.25)]
    )
    recorder.local_only = {"alice": 0.5}
    recorder.summary()
    assert looked_up == [1]  # looked up once, when the first client was named
    return tmp_path


def test_the_summary_keys_each_client_by_its_name_and_keeps_its_partition_id(named_run):
    clients = json.loads((named_run / "summary.json").read_text())["per_client"]["final_round"]
    assert list(clients) == ["alice", "bob", "node-9"]  # in partition order, deployed devices last
    assert (clients["alice"]["partition"], clients["bob"]["partition"]) == (0, 1)
    assert "partition" not in clients["node-9"]  # a deployed device keeps its node name
    assert clients["bob"]["personalized_accuracy"] == 0.75


def test_per_client_shows_names_in_partition_order(named_run):
    from fedlora.api import load_results

    table = load_results(named_run).per_client()
    assert list(table["client"]) == ["alice", "bob", "node-9"]
    assert table["partition"].tolist()[:2] == [0, 1] and table["partition"].isna().tolist() == [
        False,
        False,
        True,
    ]
    assert table["personalized_accuracy"].tolist() == [0.25, 0.75, 0.5]
    assert table["local_only_accuracy"].tolist()[0] == 0.5


def test_the_cli_s_end_of_run_table_shows_names(named_run, capsys):
    from fedlora.api import load_results
    from fedlora.cli.simulate import _clients_table

    _clients_table(load_results(named_run))
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("│")[1].strip() for line in lines if line.count("│") == 5]  # the body's rows
    assert rows == ["alice", "bob", "node-9"]
    assert "25.0%" in next(line for line in lines if "alice" in line)


def test_the_results_table_says_what_its_accuracy_counts(named_run, capsys):
    from fedlora.api import load_results
    from fedlora.cli.simulate import _table

    results = load_results(named_run)
    _table(results.summary, named_run)
    assert "mean accuracy" in capsys.readouterr().out
    config = json.loads((named_run / "config.json").read_text())
    (named_run / "config.json").write_text(json.dumps({**config, "task": "chat"}))
    _table(results.summary, named_run)
    out = capsys.readouterr().out
    assert "mean reply-token accuracy" in out and "mean accuracy" not in out


def test_summary_json_is_strict_json_and_unmeasured_figures_read_back_as_nan(named_run):
    import math

    from fedlora.api import load_results

    text = (named_run / "summary.json").read_text()
    json.loads(text, parse_constant=lambda constant: pytest.fail(f"{constant} is not strict JSON"))
    assert '"global_perplexity": null' in text  # a classification run measures no perplexity
    results = load_results(named_run)
    assert math.isnan(results.final["global_perplexity"]) and math.isnan(results.record.final.epsilon_max)
    assert math.isnan(results.rounds[0]["personalized_perplexity"])
    assert results.final["personalized_accuracy"] == pytest.approx(0.5)
