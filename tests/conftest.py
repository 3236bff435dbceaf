"""Shared fixtures: one thread, offline hub, tiny models and a tiny JSONL federation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

torch.set_num_threads(1)

from fedlora.config import RunConfig  # noqa: E402
from fedlora.models import LoadedModel, build_model  # noqa: E402

TINY = {"model": "tiny-bert", "max-length": 16, "local-steps": 2, "personal-steps": 1, "batch-size": 8}


@pytest.fixture(scope="session")
def tiny_cfg() -> RunConfig:
    return RunConfig.from_flat(TINY)


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg: RunConfig) -> LoadedModel:
    return build_model(tiny_cfg.model, 5, seed=0)


@pytest.fixture(scope="session")
def minilm_model() -> LoadedModel:
    return build_model(RunConfig.from_flat({"max-length": 16}).model, 2, seed=0)


def write_client(folder: Path, train: list[dict], test: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def jsonl_dir(tmp_path: Path) -> Path:
    """Three clients whose labels differ: client i mostly writes about topic i."""
    topics = ["sport", "music", "cooking"]
    words = {"sport": "goal match team", "music": "song band guitar", "cooking": "recipe oven salt"}
    root = tmp_path / "clients"
    for i, topic in enumerate(topics):
        other = topics[(i + 1) % 3]
        train = [{"text": f"{words[topic]} {n}", "label": topic} for n in range(12)]
        train += [{"text": f"{words[other]} {n}", "label": other} for n in range(4)]
        test = [{"text": f"{words[topic]} x{n}", "label": topic} for n in range(4)]
        write_client(root / f"client-{i}", train, test)
    return root


# `make test-fast` sets FEDLORA_TEST_FAST=1: a test that starts Flower (a simulation, a
# deployment, a notebook's federation) must be marked `federation`, or it fails here.
_FLOWER_PROGRAMS = ("flwr", "flower-superlink", "flower-supernode", "flower-superexec", "flwr-simulation")


def _starts_flower(args: object) -> bool:
    argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else [str(args)]
    programs = {Path(a).name for a in argv[:1]}
    script = " ".join(argv)
    launchers = ("fedlora.cli", "fedlora.deploy.superlink", "fedlora.deploy.runtime", "ipykernel")
    return bool(programs & set(_FLOWER_PROGRAMS)) or any(name in script for name in launchers)


@pytest.fixture(autouse=True)
def _no_flower_in_the_fast_tier(request, monkeypatch):
    if os.environ.get("FEDLORA_TEST_FAST") != "1" or request.node.get_closest_marker("federation"):
        return
    import subprocess

    original = subprocess.Popen.__init__

    def refuse(self, args, *rest, **kwargs):  # type: ignore[no-untyped-def]
        if _starts_flower(args):
            raise RuntimeError(
                f"{request.node.nodeid} starts Flower ({args!r}): mark it @pytest.mark.federation"
            )
        original(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture(autouse=True)
def _no_outer_session(monkeypatch):
    """A session named in the caller's environment is joined only where a test asks (`warm`)."""
    from fedlora import api

    monkeypatch.delenv("FEDLORA_SESSION", raising=False)
    assert api._SESSION.get() is None, "an earlier test left its fedlora.session() current"


@pytest.fixture(scope="session")
def _suite_session():
    from helpers import session_processes

    from fedlora.launch import flower_session

    # Not `fedlora.session()`: its block would stay the current session of every later test;
    # only the tests that take `warm` join this one.
    with flower_session(backend="warm") as session:
        assert session_processes(session.home) == {}  # nothing starts before its first run
        yield session
    assert session_processes(session.home) == {}, "the suite's session left processes behind"


@pytest.fixture
def warm(_suite_session, monkeypatch):
    """Runs in this test join the suite's one warm `fedlora.session`: the Python API's, and
    those of the processes it starts (the CLI, a notebook's kernel), through ``$FEDLORA_SESSION``.

    Its warm process (torch, transformers and fedlora imported once) starts with the first
    such run and serves every later one; a test that checks processes, sets environment
    variables for its clients or needs Ray stays out of it.
    """
    from fedlora import api

    monkeypatch.setenv("FEDLORA_SESSION", str(_suite_session.root))
    token = api._SESSION.set(_suite_session)
    try:
        yield _suite_session
    finally:
        api._SESSION.reset(token)
