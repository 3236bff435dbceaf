import pytest
import torch
from peft import PeftModel

from fedlora.core.errors import FedloraError
from fedlora.lora.adapters import (
    activate,
    adapter_state,
    from_record,
    load_adapter_state,
    save_peft_adapter,
    to_record,
)
from fedlora.models import GLOBAL, PERSONAL, load_base, lora_config, target_modules
from fedlora.train import tokenize


def test_adapter_state_holds_only_lora_and_head(tiny_model):
    state = tiny_model.initial_global
    # tiny-bert: 2 layers x (query, value) x (A, B) + pooler (A, B) + head (weight, bias)
    assert len(state) == 2 * 2 * 2 + 2 + 2
    assert all("lora_A" in k or "lora_B" in k or "classifier" in k for k in state)
    lora = {k: tuple(v.shape) for k, v in state.items() if "query.lora_A" in k}
    assert set(lora.values()) == {(8, 32)}  # (r, d_in)


def test_codec_round_trip_is_bit_exact(tiny_model):
    state = {k: torch.randn_like(v) for k, v in tiny_model.initial_global.items()}
    record = to_record(state)
    assert list(record.keys()) == list(state.keys())
    back = from_record(record)
    assert all(torch.equal(back[k], state[k]) for k in state)
    # The record's bytes are the float32 tensors plus the key names.
    assert record.count_bytes() >= sum(v.numel() * 4 for v in state.values())


def test_load_adapter_state_overwrites_exactly_and_rejects_mismatches(tiny_model):
    model = tiny_model.model
    state = {k: torch.full_like(v, 0.5) for k, v in tiny_model.initial_global.items()}
    load_adapter_state(model, GLOBAL, state)
    assert all(torch.equal(v, state[k]) for k, v in adapter_state(model, GLOBAL).items())
    # The personal adapter is untouched.
    assert all(
        torch.equal(v, tiny_model.initial_personal[k]) for k, v in adapter_state(model, PERSONAL).items()
    )
    first = next(iter(state))
    with pytest.raises(FedloraError, match="keys do not match"):
        load_adapter_state(model, GLOBAL, {k: v for k, v in state.items() if k != first})
    with pytest.raises(FedloraError, match="has shape"):
        load_adapter_state(model, GLOBAL, {**state, first: torch.zeros(3, 3)})
    load_adapter_state(model, GLOBAL, tiny_model.initial_global)


def test_activate_sets_exactly_the_trainable_adapter(tiny_model):
    model = tiny_model.model
    activate(model, [GLOBAL, PERSONAL], trainable=[PERSONAL])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".personal." in n for n in trainable)
    activate(model, [GLOBAL], trainable=[])
    assert not any(p.requires_grad for p in model.parameters())


def test_saved_adapter_loads_with_stock_peft_and_predicts_identically(tiny_cfg, tiny_model, tmp_path):
    state = {k: torch.randn_like(v) * 0.1 for k, v in tiny_model.initial_global.items()}
    save_peft_adapter(tmp_path / "adapter", state, lora_config(tiny_cfg.model))
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }

    base, tokenizer = load_base(tiny_cfg.model, 5, seed=0)
    stock = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    load_adapter_state(tiny_model.model, GLOBAL, state)
    activate(tiny_model.model, [GLOBAL], trainable=[])
    batch = tokenize(tokenizer, ["a short text", "another one here"], None, 16).batch([0, 1])
    with torch.no_grad():
        expected = tiny_model.model(**batch).logits
        got = stock(**batch).logits
    assert torch.allclose(got, expected, atol=1e-6)
    load_adapter_state(tiny_model.model, GLOBAL, tiny_model.initial_global)


def test_default_targets_adapt_the_bert_pooler(tiny_cfg):
    assert target_modules(tiny_cfg.model) == ["query", "value", "pooler.dense"]
    assert target_modules(tiny_cfg.model.__class__(lora_target_modules=("query",))) == ["query"]
