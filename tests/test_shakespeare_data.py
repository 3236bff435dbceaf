import math

import pytest
import torch

from fedlora import plan
from fedlora.config import DataConfig, RunConfig
from fedlora.core.errors import ConfigError, DataError
from fedlora.data import load_corpus
from fedlora.data.shakespeare import load_role_client, parse_play, role_lines, roles
from fedlora.models import build_model
from fedlora.train import batch_loss, evaluate, tokenize, train_steps

CFG = DataConfig(dataset="shakespeare")

PLAY = """# A Play

## ACT I

### SCENE I. A room. ROMEO
asleep.

_Enter ROMEO and Nurse, with
Attendants_

**ROMEO**<br>
But soft, what light<br>
through yonder window breaks?

_Exit Nurse_

It is the east, __\\[Aside]_ and Juliet is the sun.

**Nurse**<br>
[Within]_<br>
Madam\\--anon!

**NURSE**<br>
**

*Enter a Friar.*

**FRIAR LAURENCE**<br>
Holy Saint Francis!

### SCENE II. Nowhere.

Nobody says this.
""".replace("<br>", "  ")  # Markdown line breaks


def test_parse_play_keeps_spoken_lines_only():
    assert parse_play(PLAY) == [
        ("ROMEO", "But soft, what light"),
        ("ROMEO", "through yonder window breaks?"),
        ("ROMEO", "It is the east, and Juliet is the sun."),
        ("NURSE", "Madam--anon!"),
        ("FRIAR LAURENCE", "Holy Saint Francis!"),
    ]


def test_clients_are_play_role_pairs_with_enough_lines_in_fixed_order():
    clients = roles(40)
    assert len(clients) == 523
    assert len(roles(2)) == 1280 and len(roles(100)) == 315
    assert all(c.num_lines >= 40 for c in clients)
    assert list(clients) == sorted(clients, key=lambda c: (c.play, c.name))
    assert len({c.client_id for c in clients}) == len(clients)
    assert len({c.play for c in clients}) == 38
    assert clients[0].client_id == "a-midsummer-night-s-dream/BOTTOM"
    hamlet = next(c for c in clients if c.client_id == "hamlet/HAMLET")
    assert hamlet.num_lines == 1496 == len(role_lines("hamlet", "HAMLET"))
    assert role_lines("hamlet", "HAMLET")[0] == "A little more than kin, and less than kind."


def test_client_data_is_deterministic_and_tests_on_later_lines():
    n = len(roles())
    a = load_role_client(CFG, "causal-lm", 7, n)
    assert a == load_role_client(DataConfig(dataset="shakespeare"), "causal-lm", 7, n)
    role = roles()[7]
    lines = role_lines(role.play, role.name)
    # Train is the beginning of the role, test the rest: nothing shuffled, nothing lost.
    assert a.train_texts + a.test_texts == lines
    assert len(a.test_texts) == round(role.num_lines * 0.5)
    assert a.train_labels == (0,) * a.num_train and a.label_names == ()


def test_test_fraction_and_min_lines_come_from_the_config():
    client = load_role_client(DataConfig(dataset="shakespeare", test_fraction=0.1), "causal-lm", 0, 1)
    assert (client.num_train, len(client.test_texts)) == (183, 20)  # BOTTOM, 203 lines
    few = DataConfig(dataset="shakespeare", min_lines=5)
    assert len(roles(5)) == 1090
    last = load_role_client(few, "causal-lm", 1089, 1090)
    role = roles(5)[1089]
    assert last.train_texts + last.test_texts == role_lines(role.play, role.name)
    with pytest.raises(DataError, match=r"^clients: 1091 clients asked, but shakespeare has only 1090 roles"):
        load_role_client(few, "causal-lm", 0, 1091)


def test_bad_requests_fail_with_one_line():
    n = len(roles())
    with pytest.raises(DataError, match=r"^clients: 524 clients asked, but shakespeare has only 523 roles"):
        load_role_client(CFG, "causal-lm", 0, n + 1)
    with pytest.raises(DataError, match=r"^task: dataset 'shakespeare' is text only and needs causal-lm"):
        load_role_client(CFG, "classification", 0, 2)
    with pytest.raises(DataError, match=r"^min-lines: must be an integer >= 2"):
        roles(1)
    with pytest.raises(DataError, match=r"^role: hamlet has no speaker 'YORICK'$"):
        role_lines("hamlet", "YORICK")


def test_registered_as_a_bundled_dataset_with_natural_groups():
    assert RunConfig.from_flat({"dataset": "shakespeare", "task": "causal-lm"}).data.dataset == "shakespeare"
    with pytest.raises(ConfigError, match=r"^dataset: must be one of bbc-news, shakespeare"):
        plan.resolve(RunConfig(data=DataConfig(dataset="shakespear")))
    corpus = load_corpus("shakespeare")
    assert len(corpus.texts) == sum(c.num_lines for c in roles()) == 99786
    assert corpus.groups is not None and len(set(corpus.groups)) == 523


def test_one_client_trains_a_tiny_causal_lm():
    cfg = RunConfig.from_flat({"model": "tiny-llama", "task": "causal-lm", "max-length": 32})
    loaded = build_model(cfg.model, 0, seed=0)
    client = load_role_client(CFG, "causal-lm", 0, 4)
    train = tokenize(loaded.tokenizer, client.train_texts, None, cfg.model.max_length)
    test = tokenize(loaded.tokenizer, client.test_texts[:8], None, cfg.model.max_length)
    assert train.labels is None and len(train) == client.num_train
    assert 8 < train.input_ids.shape[1] <= 32
    with torch.no_grad():
        first = float(batch_loss(loaded.model, train.batch(range(4))))
    # A random model over a 30,522-token vocabulary starts near ln(30522) ~ 10.3.
    assert abs(first - math.log(30522)) < 0.5
    result = train_steps(loaded.model, train, steps=2, batch_size=4, learning_rate=5e-3, seed=0)
    assert result.steps == 2 and result.examples == 8 and math.isfinite(result.loss)
    held_out = evaluate(loaded.model, test)
    assert held_out.num_examples == 8 and math.isfinite(held_out.loss) and 0 <= held_out.accuracy <= 1
