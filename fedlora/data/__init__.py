"""Client data: bundled corpora, partitioners, the JSONL folder layout and tokenization."""

from fedlora.data.federated import ClientData, load_client_data, resolve_labels
from fedlora.data.jsonl import client_folders, read_jsonl
from fedlora.data.partition import PARTITIONERS, partition
from fedlora.data.sources import DATASETS, Corpus, load_corpus

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "ClientData",
    "Corpus",
    "client_folders",
    "load_client_data",
    "load_corpus",
    "partition",
    "read_jsonl",
    "resolve_labels",
]
