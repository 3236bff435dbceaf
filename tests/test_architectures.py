"""Any causal LM from a folder: tiny random models of several architectures, built here.

Each is saved with MiniLM's tokenizer as a model folder (what a hub download is), then
trains a round through fedlora's ClientApp with the LoRA targets PEFT picks for its
architecture, or with ``lora-target-modules=all-linear``.
"""

import logging
import math

import pytest
from conftest import write_client
from flwr.app import ConfigRecord, Context, Message, RecordDict
from helpers import as_server

from fedlora.client_app import app
from fedlora.config import RunConfig
from fedlora.core import keys
from fedlora.core.errors import ModelError
from fedlora.lora.adapters import from_record, to_record
from fedlora.models import build_model, check_model, model_source

SHAPE = {"vocab_size": 30522, "max_position_embeddings": 128}
ARCHITECTURES = {
    "qwen2": (
        "Qwen2Config",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
        ),
    ),
    "gemma": (
        "GemmaConfig",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            intermediate_size=64,
        ),
    ),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=2, n_positions=128)),
    "phi3": (
        "Phi3Config",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=64,
            pad_token_id=0,
        ),
    ),
}


def _folder(root, kind):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, extra = ARCHITECTURES[kind]
    folder = root / kind
    config = getattr(transformers, name)(**SHAPE, **extra)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_source("minilm")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("architectures")
    return {kind: _folder(root, kind) for kind in ARCHITECTURES}


@pytest.fixture
def text_dir(tmp_path):
    for i in range(2):
        rows = [{"text": f"the band played song number {n} for client {i}"} for n in range(10)]
        write_client(tmp_path / "clients" / f"client-{i}", rows, rows[:4])
    return tmp_path / "clients"


def _round(cfg):
    context = Context(
        run_id=1,
        node_id=1,
        state=RecordDict(),
        run_config=cfg.to_flat(),
        node_config={"partition-id": 0, "num-partitions": 2},
    )
    arrays = to_record(build_model(cfg.model, 0, seed=0).initial_global)
    as_server()
    replies = []
    for kind in ("train", "evaluate"):
        config = ConfigRecord({keys.C_SERVER_ROUND: 1, keys.C_PROXIMAL_MU: 0.0})
        message = Message(
            content=RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config}), dst_node_id=1, message_type=kind
        )
        reply = app(message, context)
        assert not reply.has_error(), reply.error
        replies.append(reply.content)
    return replies


@pytest.mark.parametrize("kind", ["qwen2", "gemma", "gpt2"])
def test_a_causal_lm_trains_a_round_with_its_default_lora_targets(models, text_dir, kind):
    cfg = RunConfig.from_flat(
        {
            "model": str(models[kind]),
            "task": "causal-lm",
            "data-dir": str(text_dir),
            "max-length": 16,
            "lora-rank": 4,
            "local-steps": 2,
            "personal-steps": 1,
            "batch-size": 4,
            "num-server-rounds": 1,
        }
    )
    check_model(cfg.model)
    trained, evaluated = _round(cfg)
    sent = from_record(trained.array_records[keys.ARRAYS])
    expected = {"gpt2": ".c_attn."}.get(kind, ".q_proj.")
    assert sent and all(expected in name or ".v_proj." in name for name in sent)  # PEFT's default targets
    metrics = evaluated.metric_records[keys.METRICS]
    assert math.isfinite(float(metrics[keys.M_LOSS_GLOBAL])) and float(metrics[keys.M_LOSS_GLOBAL]) > 0


def test_an_architecture_without_a_default_is_named_and_all_linear_resolves_it(models, text_dir):
    flat = {
        "model": str(models["phi3"]),
        "task": "causal-lm",
        "data-dir": str(text_dir),
        "max-length": 16,
        "lora-rank": 4,
        "local-steps": 1,
        "personal-steps": 1,
        "batch-size": 4,
        "num-server-rounds": 1,
    }
    cfg = RunConfig.from_flat(flat)
    with pytest.raises(
        ModelError, match=r"^lora-target-modules: PEFT has no default LoRA targets for .*phi3"
    ):
        check_model(cfg.model)
    every = RunConfig.from_flat({**flat, "lora-target-modules": "all-linear"})
    check_model(every.model)
    trained, _ = _round(every)
    sent = from_record(trained.array_records[keys.ARRAYS])
    # Every linear layer of the blocks: the fused attention and MLP projections too; not the LM head.
    assert any(".qkv_proj." in n for n in sent) and any(".gate_up_proj." in n for n in sent)
    assert not any("lm_head" in n for n in sent)


def test_a_tiny_model_loads_without_warnings_and_a_run_on_one_says_it_is_a_test_model(caplog, jsonl_dir):
    import warnings

    from fedlora.launch import preflight

    cfg = RunConfig.from_flat({"model": "tiny-llama", "task": "causal-lm"})
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        build_model(cfg.model, 1)
    # Nothing that reads as if another model (MiniLM's BERT, whose tokenizer it borrows) were loaded.
    assert [str(w.message) for w in caught] == [] and caplog.records == []
    preflight(RunConfig.from_flat({"model": "tiny-bert", "data-dir": str(jsonl_dir)}), 3)
    assert "model=tiny-bert is a test model with random weights" in caplog.text
