"""Client data: a registry of bundled datasets, partitioners, the JSONL folder layout.

Every dataset module registers itself (`fedlora.data.registry.register`) when this
package is imported.
"""

from fedlora.data import shakespeare, shakespeare_chat, sources
from fedlora.data.federated import load_client_data, resolve_labels
from fedlora.data.jsonl import client_folders, read_jsonl
from fedlora.data.names import client_names
from fedlora.data.partition import PARTITIONERS, partition
from fedlora.data.registry import DATASETS, ClientData, Corpus, DataSource
from fedlora.data.sources import load_corpus

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "ClientData",
    "Corpus",
    "DataSource",
    "client_folders",
    "client_names",
    "load_client_data",
    "load_corpus",
    "partition",
    "read_jsonl",
    "resolve_labels",
    "shakespeare",
    "shakespeare_chat",
    "sources",
]
