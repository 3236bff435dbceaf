"""`dataset=hf:NAME`: Hugging Face datasets built in tmp_path, loaded offline through flwr-datasets."""

import math
import re
from collections import Counter

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from fedlora import plan
from fedlora.config import DataConfig, RunConfig
from fedlora.core.errors import ConfigError, DataError
from fedlora.data import load_client_data, resolve_labels
from fedlora.data.chat import decode, encode
from fedlora.data.federated import validate_data
from fedlora.data.hf import _federation
from fedlora.launch import preflight

# Speakers with different numbers of rows, so that a client's size names its speaker.
SPEAKERS = {"ann": 4, "bob": 6, "cy": 10}
TOPICS = ["cooking", "music", "sport", "travel"]


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path, monkeypatch):
    # `datasets` caches what it reads (and FederatedDataset's shuffles) under its cache folder.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _speaker_rows(split: str = "train", speakers: dict[str, int] = SPEAKERS) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {"speaker": [], "prompt": [], "completion": []}
    for name, count in speakers.items():
        for i in range(count):
            rows["speaker"].append(name)
            rows["prompt"].append(f"{split}: {name} is asked {i}")
            rows["completion"].append(f"{name} answers {i}")
    return rows


@pytest.fixture
def chat_dir(tmp_path):
    """A `save_to_disk` folder of prompt/completion rows with a speaker id."""
    Dataset.from_dict(_speaker_rows()).save_to_disk(tmp_path / "chat")
    return tmp_path / "chat"


def _topics(n: int, prefix: str = "t") -> Dataset:
    features = Features({"text": Value("string"), "label": ClassLabel(names=TOPICS)})
    texts = [f"{prefix} {TOPICS[i % 4]} {i}" for i in range(n)]
    return Dataset.from_dict({"text": texts, "label": [i % 4 for i in range(n)]}, features=features)


@pytest.fixture
def topics_dir(tmp_path):
    """A folder of Parquet files (train and test) of texts with a ClassLabel column."""
    (tmp_path / "topics").mkdir()
    _topics(400).to_parquet(tmp_path / "topics" / "train.parquet")
    _topics(200, prefix="e").to_parquet(tmp_path / "topics" / "test.parquet")
    return tmp_path / "topics"


def _natural(folder, **kw) -> DataConfig:
    return DataConfig(dataset=f"hf:{folder}", partitioner="natural", partition_by="speaker", **kw)


def _turns(client) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    def pairs(texts):
        return [(m[0]["content"], m[1]["content"]) for m in map(decode, texts)]

    return pairs(client.train_texts), pairs(client.test_texts)


def test_natural_ids_give_each_client_exactly_its_speaker_s_rows(chat_dir):
    cfg = _natural(chat_dir)
    assert validate_data(cfg, "chat", 3) == ()
    for pid, (name, count) in enumerate(sorted(SPEAKERS.items())):
        client = load_client_data(cfg, "chat", pid, 3)
        train, test = _turns(client)
        assert sorted(train + test) == sorted(
            (f"train: {name} is asked {i}", f"{name} answers {i}") for i in range(count)
        )
        assert len(test) == max(1, round(count * cfg.test_fraction)) and not set(train) & set(test)
        assert client.label_names == () and set(client.train_labels) == {0}
    # Each record travels as chat JSONL's do: the canonical JSON of (user, assistant).
    ann = load_client_data(cfg, "chat", 0, 3)
    assert encode((("user", "train: ann is asked 3"), ("assistant", "ann answers 3"))) in (
        ann.train_texts + ann.test_texts
    )


def test_natural_ids_set_the_default_client_count(chat_dir):
    from fedlora.api import default_clients
    from fedlora.config import RunConfig

    cfg = RunConfig.from_flat(
        {"dataset": f"hf:{chat_dir}", "partitioner": "natural", "partition-by": "speaker", "task": "chat"}
    )
    assert default_clients(cfg) == len(SPEAKERS) == 3
    assert default_clients(RunConfig.from_flat({})) == 20  # the default benchmark's


def test_the_held_out_split_is_seeded(chat_dir):
    cfg = _natural(chat_dir)
    first = load_client_data(cfg, "chat", 2, 3, seed=0)
    load_client_data.cache_clear()
    _federation.cache_clear()  # a fresh process: loaded and divided again
    assert load_client_data(cfg, "chat", 2, 3, seed=0) == first
    assert load_client_data(cfg, "chat", 2, 3, seed=1).test_texts != first.test_texts


def test_fewer_clients_than_ids_take_the_first_ids_in_sorted_order(chat_dir):
    train, test = _turns(load_client_data(_natural(chat_dir), "chat", 1, 2))
    assert {prompt.split()[1] for prompt, _ in train + test} == {"bob"}


def test_a_test_split_is_divided_by_the_same_ids(tmp_path):
    splits = {"train": _speaker_rows("train"), "test": _speaker_rows("test", {"cy": 2, "ann": 1, "bob": 3})}
    DatasetDict({k: Dataset.from_dict(v) for k, v in splits.items()}).save_to_disk(tmp_path / "dd")
    cfg = _natural(tmp_path / "dd", hf_test_split="test")
    client = load_client_data(cfg, "chat", 2, 3)  # cy
    train, test = _turns(client)
    assert sorted(p for p, _ in train) == sorted(f"train: cy is asked {i}" for i in range(10))
    assert sorted(p for p, _ in test) == ["test: cy is asked 0", "test: cy is asked 1"]


def test_an_id_missing_from_the_test_split_is_refused(tmp_path):
    splits = {"train": _speaker_rows("train"), "test": _speaker_rows("test", {"ann": 1, "bob": 1})}
    DatasetDict({k: Dataset.from_dict(v) for k, v in splits.items()}).save_to_disk(tmp_path / "dd")
    with pytest.raises(
        DataError, match=r"^hf-test-split: split 'test' of hf:.*dd has no rows with speaker='cy'"
    ):
        load_client_data(_natural(tmp_path / "dd", hf_test_split="test"), "chat", 2, 3)


def test_a_messages_column_of_a_json_lines_folder_is_read_as_conversations(tmp_path):
    talks = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}"}]
        + [{"role": "assistant", "content": f"a{i}"}]
        for i in range(8)
    ]
    (tmp_path / "talks").mkdir()
    Dataset.from_dict({"messages": talks, "user": ["u1", "u2"] * 4}).to_json(
        tmp_path / "talks" / "data.jsonl"
    )
    cfg = DataConfig(dataset=f"hf:{tmp_path / 'talks'}", partitioner="natural", partition_by="user")
    client = load_client_data(cfg, "chat", 0, 2)
    got = sorted(map(decode, client.train_texts + client.test_texts), key=lambda m: m[1]["content"])
    assert got == talks[0::2]


def test_a_bad_chat_record_is_refused_naming_the_client_and_example(tmp_path):
    talks = [[{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]] * 4
    Dataset.from_dict({"messages": talks}).save_to_disk(tmp_path / "bad")
    cfg = DataConfig(dataset=f"hf:{tmp_path / 'bad'}", partitioner="iid")
    with pytest.raises(DataError, match=r"split 'train', client 0, example 1: message 1 has role 'human'"):
        load_client_data(cfg, "chat", 0, 2)


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_classification_partitions_cover_every_row_once(topics_dir, method):
    cfg = DataConfig(dataset=f"hf:{topics_dir}", partitioner=method, dirichlet_alpha=0.3)
    assert validate_data(cfg, "classification", 5) == tuple(TOPICS)
    clients = [load_client_data(cfg, "classification", pid, 5) for pid in range(5)]
    seen = [t for c in clients for t in c.train_texts + c.test_texts]
    assert sorted(seen) == sorted(_topics(400)["text"])
    for client in clients:
        for text, label in zip(
            client.train_texts + client.test_texts, client.train_labels + client.test_labels, strict=True
        ):
            assert TOPICS[label] == text.split()[1]
    if method == "iid":
        assert {c.num_train + len(c.test_texts) for c in clients} == {80}


def test_dirichlet_skews_labels_and_iid_does_not(topics_dir):
    def mean_top_share(method):
        cfg = DataConfig(dataset=f"hf:{topics_dir}", partitioner=method, dirichlet_alpha=0.1)
        shares = []
        for pid in range(5):
            labels = load_client_data(cfg, "classification", pid, 5).train_labels
            shares.append(max(Counter(labels).values()) / len(labels))
        return sum(shares) / len(shares)

    assert mean_top_share("iid") < 0.4 < 0.6 < mean_top_share("dirichlet")


def test_a_dirichlet_test_split_follows_each_client_s_training_labels(topics_dir):
    cfg = DataConfig(
        dataset=f"hf:{topics_dir}", partitioner="dirichlet", dirichlet_alpha=0.3, hf_test_split="test"
    )
    for pid in range(4):
        client = load_client_data(cfg, "classification", pid, 4)
        assert all(text.startswith("e ") for text in client.test_texts)
        train, test = Counter(client.train_labels), Counter(client.test_labels)
        for label in range(4):
            share = train[label] / client.num_train
            assert math.isclose(share, test[label] / len(client.test_texts), abs_tol=0.1)


@pytest.mark.parametrize(
    ("labels", "expected"),
    [(["sport", "music", "cooking", "music"], ("cooking", "music", "sport")), ([10, 2, 2, 10], ("2", "10"))],
)
def test_plain_label_values_are_the_sorted_distinct_values(tmp_path, labels, expected):
    rows = {"text": [f"t{i}" for i in range(8)], "label": labels * 2}
    Dataset.from_dict(rows).to_json(tmp_path / "rows.jsonl")
    cfg = DataConfig(dataset=f"hf:{tmp_path / 'rows.jsonl'}", partitioner="iid")
    assert resolve_labels(cfg, "classification") == expected
    client = load_client_data(cfg, "classification", 0, 1)
    got = {
        text: expected[label]
        for text, label in zip(
            client.train_texts + client.test_texts, client.train_labels + client.test_labels, strict=True
        )
    }
    assert got == {f"t{i}": str(value) for i, value in enumerate(labels * 2)}


def test_causal_lm_reads_the_text_column_and_drops_empty_texts(tmp_path):
    Dataset.from_dict({"body": ["one", "", "two", "three", " "], "n": [1, 2, 3, 4, 5]}).save_to_disk(
        tmp_path / "t"
    )
    cfg = DataConfig(dataset=f"hf:{tmp_path / 't'}", partitioner="iid", text_column="body")
    client = load_client_data(cfg, "causal-lm", 0, 1)
    assert sorted(client.train_texts + client.test_texts) == ["one", "three", "two"]


def test_loading_posts_no_telemetry(chat_dir, monkeypatch):
    import flwr_datasets.federated_dataset

    def refuse(*args, **kwargs):
        raise AssertionError("FederatedDataset.load_partition posts a telemetry event")

    monkeypatch.setattr(flwr_datasets.federated_dataset, "event", refuse)
    assert load_client_data(_natural(chat_dir, test_fraction=0.25), "chat", 0, 3).num_train == 3


def _error(cfg: DataConfig, task: str, clients: int = 2) -> str:
    with pytest.raises(DataError) as err:
        validate_data(cfg, task, clients)
    return str(err.value)


def test_bad_input_is_refused_in_one_line_naming_the_key(chat_dir, topics_dir, tmp_path):
    name = f"hf:{topics_dir}"
    assert _error(DataConfig(dataset=name, text_column="body"), "classification") == (
        f"text-column: {name} split 'train' has no column 'body'; its columns: text, label"
    )
    assert _error(DataConfig(dataset=name, label_column="topic"), "classification").startswith(
        f"label-column: {name} split 'train' has no column 'topic'; its columns: text, label"
    )
    assert _error(_natural(chat_dir), "chat", 5) == (
        f"clients: 5 clients asked, but hf:{chat_dir} has only 3 distinct values of partition-by 'speaker' "
        "in split 'train'"
    )
    assert _error(DataConfig(dataset=name, partitioner="iid"), "chat") == (
        "messages-column: task=chat reads a column of conversations ('messages') or columns of prompts and "
        f"completions ('prompt', 'completion'); {name} split 'train' has neither; its columns: text, label"
    )
    unlisted = _error(
        DataConfig(dataset=name, partitioner="iid", labels=("sport", "music")), "classification"
    )
    assert re.fullmatch(
        rf"{re.escape(name)} split 'train', client 0, example \d+: label '(cooking|travel)' is not in the "
        r"label set \(sport, music\)",
        unlisted,
    )
    assert _error(DataConfig(dataset=name, partitioner="iid", hf_split="validation"), "causal-lm").startswith(
        f"hf-split: {name}: The given split: 'validation' is not present in the dataset's splits"
    )
    assert _error(DataConfig(dataset=name, partitioner="iid", hf_test_split="dev"), "causal-lm").startswith(
        f"hf-test-split: {name}: The given split: 'dev' is not present"
    )
    assert _error(DataConfig(dataset=name), "causal-lm").startswith(
        f"partition-by: partitioner=dirichlet over {name} needs a column"
    )
    iid = DataConfig(dataset=f"hf:{chat_dir}", partitioner="iid", text_column="speaker")
    assert _error(iid, "causal-lm", 11) == (
        f"clients: 11 clients need at least 22 examples of split 'train' (2 each), but hf:{chat_dir} has 20"
    )
    assert _error(DataConfig(dataset="hf:nobody/no-such-dataset", partitioner="iid"), "causal-lm").startswith(
        "dataset: cannot load hf:nobody/no-such-dataset: "
    )
    (tmp_path / "notes.txt").write_text("hi\n")
    assert _error(
        DataConfig(dataset=f"hf:{tmp_path / 'notes.txt'}", partitioner="iid"), "causal-lm"
    ).startswith(f"dataset: hf:{tmp_path / 'notes.txt'} is a file of a kind that is not read")


def test_a_speaker_with_one_row_cannot_hold_out_a_test_example(tmp_path):
    Dataset.from_dict(_speaker_rows(speakers={"ann": 1, "bob": 3})).save_to_disk(tmp_path / "one")
    assert _error(_natural(tmp_path / "one"), "chat") == (
        f"clients: client 0 (speaker='ann') has 1 example(s) in split 'train' of hf:{tmp_path / 'one'}; "
        "holding out test-fraction needs at least 2 (use fewer clients, or hf-test-split)"
    )


def test_a_numeric_text_column_is_refused(chat_dir, tmp_path):
    Dataset.from_dict({"text": [1, 2, 3, 4], "label": [0, 1, 0, 1]}).save_to_disk(tmp_path / "nums")
    assert _error(DataConfig(dataset=f"hf:{tmp_path / 'nums'}", partitioner="iid"), "classification") == (
        f"text-column: column 'text' of hf:{tmp_path / 'nums'} split 'train' holds Value('int64'), not text"
    )


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        (
            {"dataset": "hf:x", "partitioner": "natural"},
            "partition-by: must be the id column for partitioner=natural over an hf: dataset (one client per "
            "value), got ''",
        ),
        (
            {"dataset": "hf: "},
            "dataset: must be hf:NAME with a hub id, a local folder or a data file as NAME, got 'hf: '",
        ),
        (
            {"hf-split": "test", "hf-test-split": "test"},
            "hf-test-split: must be a split other than hf-split, "
            "or empty (hold out test-fraction of hf-split), got 'test'",
        ),
        ({"text-column": ""}, "text-column: must be a column name, got ''"),
    ],
)
def test_config_rules_of_hf_datasets(flat, message):
    with pytest.raises(ConfigError) as err:
        plan.load(flat)
    assert str(err.value) == message


def test_preflight_counts_the_natural_ids_before_flower_starts(chat_dir):
    cfg = RunConfig.from_flat(
        {
            "dataset": f"hf:{chat_dir}",
            "partitioner": "natural",
            "partition-by": "speaker",
            "task": "chat",
            "model": "tiny-llama",
            "chat-template": "plain",
        }
    )
    with pytest.raises(DataError, match=r"^clients: 4 clients asked, but .* has only 3 distinct values"):
        preflight(cfg, 4)
    assert preflight(cfg, 3) == cfg


def test_a_relative_local_path_is_made_absolute(chat_dir, monkeypatch):
    from fedlora.api import _config_of

    monkeypatch.chdir(chat_dir.parent)
    cfg = _config_of(
        {"dataset": "hf:chat", "partitioner": "natural", "partition_by": "speaker"}, "fedavg", "auto"
    )
    assert cfg.data.dataset == f"hf:{chat_dir.resolve()}"


@pytest.mark.federation
def test_a_chat_federation_runs_on_a_local_hf_dataset(chat_dir, tmp_path, warm):
    from fedlora.api import run

    result = run(
        dataset=f"hf:{chat_dir}",
        partitioner="natural",
        partition_by="speaker",
        model="tiny-llama",
        task="chat",
        chat_template="plain",
        clients=2,
        rounds=1,
        out=tmp_path / "run",
        max_length=32,
    )
    for key in ("global_perplexity", "personalized_perplexity", "local_only_perplexity"):
        assert math.isfinite(result.final[key]), key
    assert len(result.per_client()) == 2
