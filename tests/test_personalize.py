import pytest
import torch

from fedlora.config import TrainConfig
from fedlora.lora.adapters import adapter_state
from fedlora.lora.protocol import ClientView
from fedlora.models import GLOBAL, PERSONAL
from fedlora.personalization import PERSONALIZATIONS, get_personalization
from fedlora.personalization.base import Local
from fedlora.personalization.dual import Dual, initial_personal
from fedlora.train import sample_batches, tokenize
from fedlora.train.local import evaluate_adapter, local_only, train_shared


def _local(loaded, data, global_state, cfg=None, seed=0, own=None):
    view = ClientView(global_state, own if own is not None else global_state)
    return Local(loaded, data, data, view, cfg or TrainConfig(), seed)


def train_personal(loaded, data, global_state, stored, cfg, *, seed):
    return Dual().update(_local(loaded, data, global_state, cfg, seed), stored)


def evaluate_round(loaded, data, global_state, stored):
    return evaluate_adapter(loaded, data, global_state), Dual().evaluate(
        _local(loaded, data, global_state), stored
    )


TEXTS = [f"goal match team {i}" for i in range(12)] + [f"song band guitar {i}" for i in range(12)]
LABELS = [0] * 12 + [1] * 12


def test_sample_batches_covers_each_example_once_per_pass():
    batches = list(sample_batches(10, 4, 5, seed=0))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4]
    assert sorted(batches[0] + batches[1] + batches[2][:2]) == list(range(10))
    assert list(sample_batches(3, 8, 2, seed=0))[0] in (
        [0, 1, 2],
        [0, 2, 1],
        [1, 0, 2],
        [1, 2, 0],
        [2, 0, 1],
        [2, 1, 0],
    )


def test_shared_and_personal_training_touch_only_their_own_adapter(tiny_model):
    data = tokenize(tiny_model.tokenizer, TEXTS, LABELS, 16)
    cfg = TrainConfig(batch_size=8, learning_rate=5e-3, local_steps=3, personal_steps=2)
    start = tiny_model.initial_global
    # The session's model is shared by other tests: compare with its personal adapter as it is now.
    before = adapter_state(tiny_model.model, PERSONAL)
    shared, result = train_shared(tiny_model, data, start, cfg, seed=0)
    assert result.steps == 3 and result.examples == 24
    assert all(not torch.equal(start[k], shared[k]) for k in start)  # every shared tensor trained
    # The cached model's personal adapter is untouched by shared training.
    assert all(torch.equal(v, before[k]) for k, v in adapter_state(tiny_model.model, PERSONAL).items())

    personal, presult = train_personal(tiny_model, data, shared, None, cfg, seed=1)
    assert presult is not None and presult.steps == 2
    fresh = initial_personal(tiny_model)
    assert all(not torch.equal(fresh[k], personal[k]) for k in fresh if "lora_B" in k)
    # The global adapter it trained on is loaded, unchanged.
    assert all(torch.equal(v, shared[k]) for k, v in adapter_state(tiny_model.model, GLOBAL).items())
    # Same seed, same inputs: reproducible on the shared, cached model.
    again, _ = train_shared(tiny_model, data, start, cfg, seed=0)
    assert all(torch.equal(again[k], shared[k]) for k in start)


def test_personal_head_is_stored_as_an_offset_from_the_global_head(tiny_model):
    fresh = initial_personal(tiny_model)
    heads = [k for k in fresh if "lora_" not in k]
    assert heads and all(torch.count_nonzero(fresh[k]) == 0 for k in heads)


def test_zero_personal_steps_makes_personalized_equal_global(tiny_model):
    data = tokenize(tiny_model.tokenizer, TEXTS, LABELS, 16)
    cfg = TrainConfig(batch_size=8, learning_rate=5e-3, local_steps=2, personal_steps=0)
    shared, _ = train_shared(tiny_model, data, tiny_model.initial_global, cfg, seed=1)
    personal, result = train_personal(tiny_model, data, shared, None, cfg, seed=1)
    assert result is None
    glob, pers = evaluate_round(tiny_model, data, shared, personal)
    assert glob == pers


def test_local_only_learns_a_separable_task_and_leaves_the_start_untouched(minilm_model):
    model = minilm_model
    data = tokenize(model.tokenizer, TEXTS, LABELS, 16)
    cfg = TrainConfig(batch_size=8, learning_rate=5e-3)
    before = {k: v.clone() for k, v in model.initial_global.items()}
    result, ev = local_only(model, data, data, 12, cfg, seed=0)
    assert result.steps == 12 and ev.num_examples == 24
    assert ev.accuracy == 1.0
    assert all(torch.equal(before[k], model.initial_global[k]) for k in before)
    assert adapter_state(model.model, GLOBAL).keys() == before.keys()


def test_causal_lm_path_trains_and_reports_next_token_metrics():
    import math

    from fedlora.config import ModelConfig
    from fedlora.models import build_model

    loaded = build_model(ModelConfig(model="tiny-llama", task="causal-lm", max_length=16), 0, seed=0)
    assert all("lora_" in k for k in loaded.initial_global)  # no head is shared for an LM
    data = tokenize(loaded.tokenizer, ["to be or not to be"] * 8, None, 16)
    cfg = TrainConfig(batch_size=4, learning_rate=1e-2, local_steps=10, personal_steps=5)
    before, _ = evaluate_round(loaded, data, loaded.initial_global, None)
    shared, result = train_shared(loaded, data, loaded.initial_global, cfg, seed=0)
    personal, _ = train_personal(loaded, data, shared, None, cfg, seed=1)
    glob, pers = evaluate_round(loaded, data, shared, personal)
    assert math.isfinite(result.loss) and glob.num_examples == 8
    assert glob.loss < before.loss and pers.loss < glob.loss
    assert 0.0 <= glob.accuracy <= pers.accuracy <= 1.0


def _distance(a, b):
    return sum(float((a[k] - b[k]).pow(2).sum()) for k in a)


def test_ditto_lambda_pulls_the_personal_adapter_toward_the_global_one(tiny_model):
    from fedlora.personalization.ditto import Ditto

    data = tokenize(tiny_model.tokenizer, TEXTS, LABELS, 16)
    glob = tiny_model.initial_global
    far = {}
    for lam in (0.0, 1000.0):
        cfg = TrainConfig(batch_size=8, learning_rate=5e-2, personal_steps=5, ditto_lambda=lam)
        personal, result = Ditto().update(_local(tiny_model, data, glob, cfg), None)
        assert result is not None and result.steps == 5
        far[lam] = _distance(personal, glob)
    assert 0 < far[1000.0] < 0.5 * far[0.0]


def test_finetune_restarts_from_the_global_adapter_every_round(tiny_model):
    from fedlora.personalization.finetune import FineTune

    data = tokenize(tiny_model.tokenizer, TEXTS, LABELS, 16)
    cfg = TrainConfig(batch_size=8, personal_steps=2)
    local = _local(tiny_model, data, tiny_model.initial_global, cfg, seed=3)
    first, _ = FineTune().update(local, None)
    again, _ = FineTune().update(local, first)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert _distance(first, tiny_model.initial_global) > 0


def test_none_predicts_with_the_global_adapter_and_keeps_nothing(tiny_model):
    from fedlora.personalization.none import NoPersonalization

    data = tokenize(tiny_model.tokenizer, TEXTS, LABELS, 16)
    shared, _ = train_shared(tiny_model, data, tiny_model.initial_global, TrainConfig(batch_size=8), seed=0)
    local = _local(tiny_model, data, shared)
    assert NoPersonalization().update(local, None) == (None, None)
    assert NoPersonalization().evaluate(local, None) == evaluate_adapter(tiny_model, data, shared)


def test_fedsa_lora_predicts_with_the_clients_own_b(tiny_model):
    from fedlora.personalization.fedsa_lora import FedSALoRA

    data = tokenize(tiny_model.tokenizer, TEXTS, LABELS, 16)
    own, _ = train_shared(tiny_model, data, tiny_model.initial_global, TrainConfig(batch_size=8), seed=0)
    local = _local(tiny_model, data, tiny_model.initial_global, own=own)
    assert FedSALoRA().evaluate(local, None) == evaluate_adapter(tiny_model, data, own)


def test_fedprox_term_keeps_the_shared_adapter_near_its_start(tiny_model):
    data = tokenize(tiny_model.tokenizer, TEXTS, LABELS, 16)
    cfg = TrainConfig(batch_size=8, learning_rate=5e-2, local_steps=5)
    start = tiny_model.initial_global
    moved = {
        mu: _distance(train_shared(tiny_model, data, start, cfg, seed=0, proximal_mu=mu)[0], start)
        for mu in (0.0, 1000.0)
    }
    assert 0 < moved[1000.0] < 0.5 * moved[0.0]


def test_ffa_lora_training_leaves_a_frozen(tiny_model):
    data = tokenize(tiny_model.tokenizer, TEXTS, LABELS, 16)
    start = tiny_model.initial_global
    state, _ = train_shared(tiny_model, data, start, TrainConfig(batch_size=8), seed=0, frozen=("lora_A",))
    assert all(torch.equal(state[k], start[k]) for k in start if "lora_A" in k)
    assert all(not torch.equal(state[k], start[k]) for k in start if "lora_B" in k)


@pytest.mark.parametrize("name", PERSONALIZATIONS.names())
def test_every_registered_method_leaves_the_global_adapter_alone_and_predicts(tiny_model, name):
    # Registry-wide: a new method is checked here without editing this file.
    data = tokenize(tiny_model.tokenizer, TEXTS, LABELS, 16)
    cfg = TrainConfig(batch_size=8, learning_rate=5e-3, local_steps=2, personal_steps=2)
    shared, _ = train_shared(tiny_model, data, tiny_model.initial_global, cfg, seed=0)
    before = {k: v.clone() for k, v in shared.items()}
    method = get_personalization(name)
    local = _local(tiny_model, data, shared, cfg, seed=3)
    stored, result = method.update(local, None)
    assert all(torch.equal(before[k], shared[k]) for k in before)  # the view is not written to
    assert result is None or result.steps == cfg.personal_steps
    again = method.evaluate(local, stored)
    assert again.num_examples == len(TEXTS) and 0.0 <= again.accuracy <= 1.0
    assert method.paper or name == "none"
    assert method.summary and method.keeps and method.prediction
