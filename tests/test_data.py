import json
from collections import Counter

import pytest

from fedlora.config import DataConfig
from fedlora.core.errors import DataError
from fedlora.data import load_client_data, load_corpus, partition
from fedlora.data.federated import validate_data


def test_bbc_news_is_real_and_complete():
    corpus = load_corpus("bbc-news")
    assert corpus.label_names == ("business", "entertainment", "politics", "sports", "tech")
    assert len(corpus.texts) == 2125  # 2,225 files, 100 verbatim repeats dropped
    assert Counter(corpus.labels) == {0: 503, 1: 369, 2: 403, 3: 503, 4: 347}


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_partitions_cover_every_example_once(method):
    labels = [i % 4 for i in range(400)]
    parts = partition(labels, 8, method=method, alpha=0.3, seed=1)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(400))
    assert all(len(p) >= 4 for p in parts)


def test_dirichlet_skews_labels_and_iid_does_not():
    labels = [i % 5 for i in range(1000)]

    def mean_top_share(parts):
        shares = [max(Counter(labels[i] for i in p).values()) / len(p) for p in parts]
        return sum(shares) / len(shares)

    skewed = mean_top_share(partition(labels, 10, method="dirichlet", alpha=0.1, seed=0))
    uniform = mean_top_share(partition(labels, 10, method="iid", seed=0))
    assert uniform < 0.35 < 0.6 < skewed


def test_natural_partition_groups_by_id():
    labels = [0, 1, 0, 1, 0, 1, 0, 1]
    groups = ["a", "a", "b", "b", "c", "c", "d", "d"]
    parts = partition(labels, 4, method="natural", groups=groups, min_size=2)
    assert sorted(sorted(p) for p in parts) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(DataError, match="natural client ids"):
        partition(labels, 2, method="natural", groups=None, min_size=2)


def test_more_clients_than_examples_is_refused():
    with pytest.raises(
        DataError,
        match=r"^clients: 600 clients need at least 2400 examples \(4 each\), but the data has 2125$",
    ):
        validate_data(DataConfig(), "classification", 600)


def test_bundled_client_split_is_disjoint_and_deterministic():
    cfg = DataConfig()
    a = load_client_data(cfg, "classification", 3, 10, 0)
    b = load_client_data(cfg, "classification", 3, 10, 0)
    assert a == b
    assert not set(a.train_texts) & set(a.test_texts)
    assert len(a.test_texts) == round((a.num_train + len(a.test_texts)) * 0.5)


def test_jsonl_folder_loads_with_inferred_labels(jsonl_dir):
    cfg = DataConfig(data_dir=str(jsonl_dir))
    assert validate_data(cfg, "classification", 3) == ("cooking", "music", "sport")
    client = load_client_data(cfg, "classification", 0, 3)
    assert client.label_names == ("cooking", "music", "sport")
    assert client.num_train == 16 and len(client.test_texts) == 4
    assert set(client.test_labels) == {2}


def test_missing_data_folder(tmp_path):
    cfg = DataConfig(data_dir=str(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"^data-dir: folder '.*nope' does not exist$"):
        validate_data(cfg, "classification", 2)


def test_client_folder_without_train_jsonl(jsonl_dir):
    (jsonl_dir / "client-1" / "train.jsonl").unlink()
    with pytest.raises(DataError, match=r"^data-dir: client folder '.*client-1' has no train.jsonl$"):
        validate_data(DataConfig(data_dir=str(jsonl_dir)), "classification", 3)


def test_label_not_in_label_set(jsonl_dir):
    cfg = DataConfig(data_dir=str(jsonl_dir), labels=("sport", "music"))
    with pytest.raises(
        DataError,
        match=r"client-1/train.jsonl: record 13 has label 'cooking', not in the label set \(sport, music\)$",
    ):
        validate_data(cfg, "classification", 3)


def test_malformed_line_names_file_and_line(jsonl_dir):
    path = jsonl_dir / "client-2" / "test.jsonl"
    path.write_text(json.dumps({"text": "ok", "label": "sport"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"client-2/test.jsonl:2: not valid JSON"):
        validate_data(DataConfig(data_dir=str(jsonl_dir)), "classification", 3)
    path.write_text(json.dumps({"label": "sport"}) + "\n")
    with pytest.raises(
        DataError, match=r'client-2/test.jsonl:1: expected an object with a string "text" field'
    ):
        validate_data(DataConfig(data_dir=str(jsonl_dir)), "classification", 3)


def test_more_clients_than_folders(jsonl_dir):
    with pytest.raises(
        DataError, match=r"^clients: 5 clients asked, but data-dir .* has only 3 client folders$"
    ):
        validate_data(DataConfig(data_dir=str(jsonl_dir)), "classification", 5)


def test_a_client_folder_added_or_broken_later_is_seen(tmp_path):
    from conftest import write_client

    from fedlora.data.jsonl import client_folders

    rows = [{"text": "a", "label": "x"}]
    for name in ("a", "c"):
        write_client(tmp_path / name, rows, rows)
    assert [p.name for p in client_folders(tmp_path)] == ["a", "c"]
    write_client(tmp_path / "b", rows, rows)  # the listing is cached, but not past a change
    assert [p.name for p in client_folders(tmp_path)] == ["a", "b", "c"]
    (tmp_path / "c" / "test.jsonl").unlink()
    with pytest.raises(DataError, match=r"'.*/c' has no test\.jsonl"):
        client_folders(tmp_path)
    cfg = DataConfig(data_dir=str(tmp_path), labels=("x",))
    assert load_client_data(cfg, "classification", 0, 3).train_texts == ("a",)
    with pytest.raises(DataError, match=r"'.*/c' has no test\.jsonl"):
        load_client_data(cfg, "classification", 2, 3)
