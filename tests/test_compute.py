"""Devices, number formats and memory savers: same updates, float32 exchange, clear errors."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError, ModelError
from fedlora.launch import preflight
from fedlora.lora.adapters import activate, adapter_state
from fedlora.models import GLOBAL, build_model
from fedlora.models.device import check_compute, resolve_device
from fedlora.train import Schedule, Tokenized, backward_batch, batch_loss, evaluate, tokenize, train_steps

TEXTS = [
    f"sentence number {i} about {'music' if i % 2 else 'sport'} and more words" * (1 + i % 3)
    for i in range(12)
]


def _model(**model):
    base = {"model": "tiny-bert", "max-length": 32, **model}
    cfg = RunConfig.from_flat(base)
    return build_model(cfg.model, 2, seed=0)


def _data(loaded, task: str = "classification") -> Tokenized:
    labels = [i % 2 for i in range(len(TEXTS))] if task == "classification" else None
    return tokenize(loaded.tokenizer, TEXTS, labels, 32)


def _grads(loaded, data: Tokenized, micro: int, train: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    # Eval mode: no dropout, whose masks depend on the batch's shape. Train mode: seeded dropout.
    activate(loaded.model, [GLOBAL], trainable=[GLOBAL])
    loaded.model.zero_grad(set_to_none=True)
    loaded.model.train(train)
    torch.manual_seed(0)
    loss = backward_batch(loaded.model, data.batch(range(len(data))), micro)
    grads = {n: p.grad.clone() for n, p in loaded.model.named_parameters() if p.grad is not None}
    loaded.model.eval()
    return loss, grads


@pytest.mark.parametrize(("model", "task"), [("tiny-bert", "classification"), ("tiny-llama", "causal-lm")])
@pytest.mark.parametrize("micro", [1, 5])
def test_gradient_accumulation_gives_the_whole_batch_s_gradient(model, task, micro):
    loaded = _model(model=model, task=task)
    data = _data(loaded, task)
    whole_loss, whole = _grads(loaded, data, 0)
    loss, accumulated = _grads(loaded, data, micro)
    assert whole and whole.keys() == accumulated.keys()
    assert abs(loss - whole_loss) < 1e-5
    worst = max(float((whole[k] - accumulated[k]).abs().max()) for k in whole)
    assert worst < 1e-5, worst
    assert max(float(g.abs().max()) for g in whole.values()) > 1e-3  # the gradients are not all zero


@pytest.mark.parametrize(("model", "task"), [("tiny-bert", "classification"), ("tiny-llama", "causal-lm")])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(model, task):
    plain, checkpointed = (
        _model(model=model, task=task),
        _model(model=model, task=task, **{"gradient-checkpointing": True}),
    )
    assert checkpointed.model.base_model.model.is_gradient_checkpointing
    data = _data(plain, task)
    # Train mode (checkpointing applies only there), with the same dropout draws.
    (loss, grads), (loss_c, grads_c) = (
        _grads(plain, data, 0, train=True),
        _grads(checkpointed, data, 0, train=True),
    )
    assert abs(loss - loss_c) < 1e-6
    assert max(float((grads[k] - grads_c[k]).abs().max()) for k in grads) < 1e-6


def test_a_bfloat16_base_trains_float32_adapters_and_exchanges_float32():
    loaded = _model(**{"base-dtype": "bfloat16"})
    dtypes = {n: p.dtype for n, p in loaded.model.named_parameters()}
    assert any(
        d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n and "modules_to_save" not in n
    )
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n or "modules_to_save" in n)
    data = _data(loaded)
    activate(loaded.model, [GLOBAL], trainable=[GLOBAL])
    before = adapter_state(loaded.model, GLOBAL)
    result = train_steps(loaded.model, data, steps=3, batch_size=4, learning_rate=1e-2, seed=0)
    after = adapter_state(loaded.model, GLOBAL)
    assert math.isfinite(result.loss)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert math.isfinite(evaluate(loaded.model, data).loss)


def test_bf16_autocast_on_the_cpu_stays_close_to_fp32():
    fp32, bf16 = _model(), _model(precision="bf16")
    data = _data(fp32)
    a, b = evaluate(fp32.model, data), evaluate(bf16.model, data, precision="bf16")
    assert abs(a.loss - b.loss) < 0.02 * a.loss


def test_a_cosine_schedule_runs_over_the_federation_s_rounds():
    rounds, steps = 4, 5
    factors = [
        Schedule.for_round("cosine", 0.1, r, rounds, steps)(i)
        for r in range(1, rounds + 1)
        for i in range(steps)
    ]
    assert factors[0] < factors[1] <= 1.0  # warm-up over the first 10% (two steps)
    assert max(factors) == pytest.approx(1.0, abs=0.02) and factors[-1] < 0.01
    assert all(x >= y for x, y in zip(factors[2:-1], factors[3:], strict=True))  # decays after the warm-up
    assert {Schedule()(i) for i in range(10)} == {1.0}  # the default is flat


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"device": "gpu"}, "device: must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ({"base-dtype": "int8"}, "base-dtype: must be one of float32, bfloat16, float16"),
        ({"quantization": "2bit"}, "quantization: must be one of none, 8bit, 4bit"),
        ({"precision": "fp8"}, "precision: must be one of fp32, bf16, fp16"),
        ({"micro-batch-size": -1}, "micro-batch-size: must be an integer in [0, 4096]"),
        ({"lr-schedule": "linear"}, "lr-schedule: must be one of constant, cosine"),
        ({"lr-warmup-fraction": 1.0}, "lr-warmup-fraction: must be a number in [0, 1)"),
    ],
)
def test_bad_compute_values_are_refused_naming_the_key(flat, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunConfig.from_flat(flat)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
@pytest.mark.parametrize(
    ("flat", "message"),
    [
        ({"device": "cuda"}, "device: 'cuda' needs a CUDA GPU, and torch sees none on this machine"),
        ({"device": "cuda:1"}, "device: 'cuda:1' needs a CUDA GPU"),
        ({"precision": "fp16", "device": "cpu"}, "precision: fp16 needs a GPU"),
        (
            {"base-dtype": "float16", "device": "cpu"},
            "base-dtype: float16 needs a GPU; on the CPU use bfloat16",
        ),
        ({"quantization": "4bit", "device": "cpu"}, "quantization: 4bit needs a CUDA GPU"),
        ({"quantization": "8bit"}, "quantization: 8bit needs a CUDA GPU"),
    ],
)
def test_what_this_machine_cannot_do_is_one_line_before_training(flat, message, jsonl_dir):
    cfg = RunConfig.from_flat({"model": "tiny-bert", "data-dir": str(jsonl_dir), **flat})
    with pytest.raises(ModelError, match=re.escape(message)):
        check_compute(cfg.model)
    with pytest.raises(ModelError, match=re.escape(message)):
        preflight(cfg, 3)  # what `fedlora simulate` runs before Flower starts


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks a machine without MPS")
def test_mps_where_there_is_none_is_one_line():
    with pytest.raises(ModelError, match="device: 'mps' needs Apple silicon"):
        resolve_device("mps")


def test_auto_is_this_machine_s_best_device():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        (
            {"strategy": "fedex-lora", "quantization": "4bit"},
            "quantization: strategy 'fedex-lora' adds dense updates",
        ),
        ({"strategy": "flora", "quantization": "8bit"}, "quantization: strategy 'flora' adds dense updates"),
        ({"dp-noise-multiplier": 1.0, "precision": "bf16"}, "precision: DP-SGD clips per-example gradients"),
        (
            {"dp-noise-multiplier": 1.0, "micro-batch-size": 4},
            "micro-batch-size: DP-SGD draws a Poisson batch",
        ),
    ],
)
def test_combinations_that_cannot_work_are_refused_by_the_plan(flat, message):
    import fedlora.plan

    with pytest.raises(ConfigError, match=message):
        fedlora.plan.resolve(RunConfig.from_flat(flat))


def test_dp_sgd_over_a_bfloat16_base_trains():
    from fedlora.train.dpsgd import DPSettings, dp_train_steps

    loaded = _model(**{"base-dtype": "bfloat16"})
    data = _data(loaded)
    activate(loaded.model, [GLOBAL], trainable=[GLOBAL])
    before = adapter_state(loaded.model, GLOBAL)
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5)
    result = dp_train_steps(loaded.model, data, steps=2, learning_rate=1e-2, seed=0, dp=dp)
    assert math.isfinite(result.loss)
    assert any(not torch.equal(before[k], v) for k, v in adapter_state(loaded.model, GLOBAL).items())


def test_a_node_s_own_device_wins_over_the_run_s(tmp_path):
    from fedlora.deploy import node_config

    config = node_config(tmp_path, state_dir=tmp_path / "state", device="cpu")
    assert 'device="cpu"' in config
    with pytest.raises(ConfigError, match="device: must be auto, cpu"):
        node_config(tmp_path, device="tpu")
    assert dataclasses.replace(RunConfig().model, device="cpu").device == "cpu"


def _lm_batch(**model):
    """A tiny Llama (``model`` options) in eval mode, its global adapter trainable, and one batch."""
    loaded = _model(model="tiny-llama", task="causal-lm", **model)
    data = _data(loaded, "causal-lm")
    activate(loaded.model, [GLOBAL], trainable=[GLOBAL])
    loaded.model.eval()
    return loaded, data.batch(range(len(data)))


def test_the_chunked_next_token_loss_is_transformers_own():
    loaded, batch = _lm_batch()
    assert int(batch["attention_mask"][:, 1:].sum()) > 128  # two chunks, and padding
    results = []
    for ours in (True, False):
        loaded.model.zero_grad(set_to_none=True)
        if ours:
            loss = batch_loss(loaded.model, batch)
        else:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = loaded.model(**batch, labels=labels).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in loaded.model.named_parameters() if p.grad is not None}
        results.append((float(loss), grads))
    (mine, my_grads), (theirs, their_grads) = results
    assert abs(mine - theirs) < 1e-6 and my_grads.keys() == their_grads.keys() and my_grads
    assert max(float((my_grads[k] - their_grads[k]).abs().max()) for k in my_grads) < 1e-6


def test_evaluating_a_causal_lm_a_few_rows_of_logits_at_a_time_changes_nothing(monkeypatch):
    import fedlora.train.loops as loops

    loaded = _model(model="tiny-llama", task="causal-lm")
    data = _data(loaded, "causal-lm")
    chunked = evaluate(loaded.model, data)
    monkeypatch.setattr(loops, "_PLAIN_LM_HEADS", frozenset())  # the model's own logits, whole
    whole = evaluate(loaded.model, data)
    assert abs(chunked.loss - whole.loss) < 1e-6 and chunked.accuracy == whole.accuracy
    assert max(abs(a - b) for a, b in zip(chunked.example_losses, whole.example_losses, strict=True)) < 1e-5


def _saved_bytes(run) -> tuple[int, object]:
    """The memory autograd keeps for backward while ``run()`` builds its graph (each storage once)."""
    sizes: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(sizes.values()), out


def test_a_bfloat16_llama_s_norms_keep_only_their_input_and_compute_as_transformers(monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    loaded = _model(model="tiny-llama", task="causal-lm", **{"base-dtype": "bfloat16"})
    norms = [m for m in loaded.model.modules() if isinstance(m, LlamaRMSNorm)]
    layers = loaded.model.get_base_model().config.num_hidden_layers
    assert len(norms) == 2 * layers + 1 and all("forward" in vars(m) for m in norms)
    import os

    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "16"  # a bfloat16 base on the CPU
    torch.manual_seed(0)
    norm = norms[0]
    x = torch.randn(4, 9, norm.weight.shape[0], dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn_like(norm.weight) * 0.1 + 1
    norm.weight.data.copy_(weight)
    results = []
    for forward in (norm.forward, lambda h: LlamaRMSNorm.forward(norm, h)):
        x.grad = None
        saved, y = _saved_bytes(lambda f=forward: f(x))
        (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        results.append((saved, y.detach(), x.grad.clone()))
    (lean_saved, lean_y, lean_grad), (hf_saved, hf_y, hf_grad) = results
    assert torch.equal(lean_y, hf_y)  # the same forward, bit for bit
    assert float((lean_grad.float() - hf_grad.float()).abs().max()) <= 0.01 * float(hf_grad.abs().max())
    assert lean_saved < 0.6 * hf_saved  # the bfloat16 input and a float per row, not a float32 copy
    # A float32 base keeps transformers' norms untouched.
    plain = _model(model="tiny-llama", task="causal-lm")
    assert not any("forward" in vars(m) for m in plain.model.modules() if isinstance(m, LlamaRMSNorm))


def test_lora_inputs_pass_uncast_under_autocast_with_the_same_loss_and_gradients():
    loaded, batch = _lm_batch(precision="bf16", **{"base-dtype": "bfloat16"})
    results = []
    for ours in (True, False):
        loaded.model.zero_grad(set_to_none=True)
        if ours:
            saved, loss = _saved_bytes(lambda: backward_batch(loaded.model, batch, precision="bf16"))
        else:  # PEFT as it is: each adapted layer's input cast to float32 first
            with torch.autocast("cpu", dtype=torch.bfloat16):
                saved, part = _saved_bytes(lambda: batch_loss(loaded.model, batch))
            part.backward()
            loss = float(part.detach())
        grads = {n: p.grad.clone() for n, p in loaded.model.named_parameters() if p.grad is not None}
        results.append((saved, loss, grads))
    (mine_saved, mine, my_grads), (their_saved, theirs, their_grads) = results
    assert mine == theirs and my_grads.keys() == their_grads.keys() and my_grads
    assert all(torch.equal(my_grads[k], their_grads[k]) for k in my_grads)  # bit for bit
    assert all(g.dtype == torch.float32 for g in my_grads.values())
    assert mine_saved < their_saved
