"""FedDPA's instance-wise weighting: the rule, its ends, its hooks, a round on a classifier."""

import pytest
import torch

from fedlora.config import ModelConfig, TrainConfig
from fedlora.lora.adapters import activate
from fedlora.lora.protocol import ClientView
from fedlora.models import PERSONAL, build_model
from fedlora.personalization import feddpa
from fedlora.personalization.base import Local
from fedlora.personalization.dual import Dual
from fedlora.personalization.feddpa import FedDPA, instance_weighted
from fedlora.train import tokenize
from fedlora.train.local import evaluate_adapter, train_shared

TEXTS = [f"goal match team {i}" for i in range(12)] + [f"song band guitar {i}" for i in range(12)]
LABELS = [0] * 12 + [1] * 12
CFG = TrainConfig(batch_size=8, learning_rate=5e-3, local_steps=2, personal_steps=3)


def _round(loaded, data, cfg=CFG):
    """A trained global adapter and a personal one trained on top of it (as `dual` does)."""
    shared, _ = train_shared(loaded, data, loaded.initial_global, cfg, seed=0)
    local = Local(loaded, data, data, ClientView(shared, shared), cfg, seed=1)
    stored, result = FedDPA().update(local, None)
    return local, stored, result


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_an_input_like_the_client_s_data_weights_the_personal_adapter_more(tiny_model):
    # Prepare: a client trained on sport and music texts; one probe from its data, one unlike it.
    data = tokenize(tiny_model.tokenizer, TEXTS, LABELS, 16)
    local, stored, _ = _round(tiny_model, data)
    probe = tokenize(
        tiny_model.tokenizer, ["goal match team 3", "quantum zebra purple xylophone"], [0, 0], 16
    )
    # The paper's rule computed by hand: mean-pooled last hidden states of the personal
    # adapter alone; the mean cosine similarity of the probe to every training input.
    activate(tiny_model.model, [PERSONAL], trainable=[])
    bert = tiny_model.model.get_base_model().bert

    def embed(rows):
        with torch.no_grad():
            hidden = bert(rows.input_ids, attention_mask=rows.attention_mask)[0]
        mask = rows.attention_mask[..., None].float()
        return (hidden * mask).sum(1) / mask.sum(1)

    cos = torch.nn.functional.cosine_similarity(embed(probe)[:, None], embed(data)[None], dim=-1)
    expected = cos.mean(1).clamp(0.0, 1.0)

    # Execute
    FedDPA().prepare(local, stored)
    with instance_weighted(tiny_model, data) as weights, torch.no_grad():
        tiny_model.model(**probe.batch([0, 1]))
    near, far = weights.lora[PERSONAL].tolist()

    # Assert
    assert 0.0 < far < near <= 1.0
    assert torch.allclose(weights.lora[PERSONAL], expected, atol=1e-5)


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_weights_forced_to_the_ends_give_global_only_and_dual_exactly(tiny_model, monkeypatch, task):
    # Prepare
    if task == "classification":
        loaded, data = tiny_model, tokenize(tiny_model.tokenizer, TEXTS, LABELS, 16)
    else:
        loaded = build_model(ModelConfig(model="tiny-llama", task=task, max_length=16), 0, seed=0)
        data = tokenize(loaded.tokenizer, TEXTS, None, 16)
    local, stored, _ = _round(loaded, data)
    global_only = evaluate_adapter(loaded, data, local.view.global_state).example_losses
    dual = Dual().evaluate(local, stored).example_losses
    assert global_only != dual  # the personal adapter changes every prediction

    # Execute: t(x) = 0, t(x) = 1, and t = 1 on even rows, 0 on odd ones.
    results = {}
    for ends, rule in {
        "zero": torch.zeros_like,
        "one": torch.ones_like,
        "alternate": lambda s: (torch.arange(len(s)) % 2 == 0).to(s.dtype),
    }.items():
        monkeypatch.setattr(feddpa, "_personal_weight", rule)
        results[ends] = FedDPA().evaluate(local, stored).example_losses

    # Assert: exactly, row by row.
    assert results["zero"] == global_only
    assert results["one"] == dual
    assert results["alternate"] == tuple(
        d if i % 2 == 0 else g for i, (d, g) in enumerate(zip(dual, global_only, strict=True))
    )


def test_no_hook_is_left_after_evaluation(tiny_model):
    # Prepare
    data = tokenize(tiny_model.tokenizer, TEXTS, LABELS, 16)
    local, stored, _ = _round(tiny_model, data)
    hooks = _hooks(tiny_model.model)
    before = evaluate_adapter(tiny_model, data, local.view.global_state)

    # Execute: an evaluation, and a weighted region left by an error.
    FedDPA().evaluate(local, stored)
    after_evaluation = _hooks(tiny_model.model)
    with pytest.raises(RuntimeError), instance_weighted(tiny_model, data):
        assert _hooks(tiny_model.model) > hooks
        raise RuntimeError("inside")

    # Assert
    assert after_evaluation == hooks and _hooks(tiny_model.model) == hooks
    assert evaluate_adapter(tiny_model, data, local.view.global_state) == before


def test_a_classifier_round_trains_like_dual_and_evaluates(minilm_model):
    # Prepare
    data = tokenize(minilm_model.tokenizer, TEXTS, LABELS, 16)
    cfg = TrainConfig(batch_size=8, learning_rate=5e-3, local_steps=4, personal_steps=2)

    # Execute
    local, stored, result = _round(minilm_model, data, cfg)
    personalized = FedDPA().evaluate(local, stored)
    dual = Dual().evaluate(local, stored)

    # Assert: the personal state is dual's (nothing else is kept); the prediction is weighted.
    assert result is not None and result.steps == cfg.personal_steps
    assert stored is not None and stored.keys() == Dual().update(local, None)[0].keys()
    assert personalized.num_examples == len(TEXTS) and 0.0 <= personalized.accuracy <= 1.0
    assert personalized.example_losses != dual.example_losses
