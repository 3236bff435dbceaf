import torch

from fedlora.adapters import adapter_state
from fedlora.config import TrainConfig
from fedlora.models import GLOBAL
from fedlora.personalize import evaluate_round, initial_personal, local_only, train_round
from fedlora.train import sample_batches, tokenize

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


def test_round_trains_global_then_personal_and_keeps_them_apart(tiny_model):
    data = tokenize(tiny_model.tokenizer, TEXTS, LABELS, 16)
    cfg = TrainConfig(batch_size=8, learning_rate=5e-3, local_steps=3, personal_steps=2)
    start = tiny_model.initial_global
    out = train_round(tiny_model, data, start, None, cfg, seed=0)
    assert out.shared.steps == 3 and out.personal is not None and out.personal.steps == 2
    changed = [k for k in start if not torch.equal(start[k], out.global_state[k])]
    assert changed == list(start)  # every shared tensor trained (B from zero, head, A)
    fresh = initial_personal(tiny_model)
    assert all(not torch.equal(fresh[k], out.personal_state[k]) for k in fresh if "lora_B" in k)
    # Same seed, same inputs: the round is reproducible on the shared, cached model.
    again = train_round(tiny_model, data, start, None, cfg, seed=0)
    assert all(torch.equal(again.global_state[k], out.global_state[k]) for k in start)


def test_personal_head_is_stored_as_an_offset_from_the_global_head(tiny_model):
    fresh = initial_personal(tiny_model)
    heads = [k for k in fresh if "lora_" not in k]
    assert heads and all(torch.count_nonzero(fresh[k]) == 0 for k in heads)


def test_zero_personal_steps_makes_personalized_equal_global(tiny_model):
    data = tokenize(tiny_model.tokenizer, TEXTS, LABELS, 16)
    cfg = TrainConfig(batch_size=8, learning_rate=5e-3, local_steps=2, personal_steps=0)
    out = train_round(tiny_model, data, tiny_model.initial_global, None, cfg, seed=1)
    glob, pers = evaluate_round(tiny_model, data, out.global_state, out.personal_state)
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
