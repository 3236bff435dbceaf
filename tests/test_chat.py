"""Chat and instruction data: records, the assistant-token loss mask, truncation, bad input."""

import json

import pytest
import torch
from conftest import write_client

from fedlora.config import RunConfig
from fedlora.core.errors import DataError
from fedlora.data.chat import conversation, decode
from fedlora.data.jsonl import read_jsonl
from fedlora.models import build_model, model_source
from fedlora.train import batch_loss
from fedlora.train.chat import PLAIN_TEMPLATE, template_for, tokenize_chat

CHAT = RunConfig.from_flat(
    {"model": "tiny-llama", "task": "chat", "chat-template": "plain", "max-length": 48, "lora-rank": 4}
)
TALK = [
    {"role": "user", "content": "hi there"},
    {"role": "assistant", "content": "hello friend"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "see you"},
]


@pytest.fixture(scope="module")
def tiny_chat():
    return build_model(CHAT.model, 0, seed=0)


def _counted(tokenizer, data, row=0):
    """The tokens the loss counts in ``row``, as text pieces."""
    ids = data.input_ids[row][data.loss_mask[row].bool()]
    return tokenizer.convert_ids_to_tokens(ids.tolist())


def test_the_plain_template_counts_exactly_the_assistant_tokens(tiny_chat):
    tok = tiny_chat.tokenizer  # MiniLM's lower-casing WordPiece: no chat template of its own
    data = tokenize_chat(tok, [TALK], 48, PLAIN_TEMPLATE)
    # Rendered: "### User:\nhi there\n\n### Assistant:\nhello friend\n\n### User:\nbye\n\n### Assistant:\n..."
    # The assistant's tokens are its two turns' words; the headers, the user's words and
    # the markup are not counted.
    assert _counted(tok, data) == ["hello", "friend", "see", "you"]
    every = tok.convert_ids_to_tokens(data.input_ids[0][data.attention_mask[0].bool()].tolist())
    assert every.count("#") == 12 and every.count("user") == 2 and every.count("assistant") == 2
    assert int(data.attention_mask.sum()) == len(every)


@pytest.mark.slow
def test_smollm2s_own_template_counts_each_answer_and_its_end_of_turn():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_source("smollm2"))
    talk = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye now."},
    ]
    data = tokenize_chat(tok, [talk], 128, template_for(tok, "auto", "smollm2"))
    ids, mask = data.input_ids[0].tolist(), data.loss_mask[0].tolist()
    # ChatML: "<|im_start|>assistant\n" is the generation prompt; the turn that follows is
    # "Hello!<|im_end|>\n". Runs of counted tokens, decoded:
    runs, current = [], []
    for token, counted in zip(ids, mask, strict=True):
        if counted:
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    runs += [tok.decode(current)] if current else []
    assert runs == ["Hello!<|im_end|>\n", "Bye now.<|im_end|>\n"]
    # ... and each counted token is one the template put in an assistant turn.
    expected = len(tok("Hello!")["input_ids"]) + len(tok("Bye now.")["input_ids"]) + 4  # 2 x (<|im_end|>, \n)
    assert sum(mask) == expected
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")


def test_the_loss_counts_only_the_assistant_tokens(tiny_chat):
    tok, model = tiny_chat.tokenizer, tiny_chat.model
    data = tokenize_chat(tok, [TALK, TALK[:2]], 48, PLAIN_TEMPLATE)
    batch = data.batch([0, 1])
    ours = batch_loss(model, batch)
    labels = batch["input_ids"].masked_fill(batch["loss_mask"] == 0, -100)
    theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), abs=1e-5)
    everything = model(
        **{k: batch[k] for k in ("input_ids", "attention_mask")}, labels=batch["input_ids"]
    ).loss
    assert abs(float(ours.detach()) - float(everything.detach())) > 1e-3  # a different set of tokens


def test_truncation_cuts_the_oldest_context_and_keeps_the_response(tiny_chat, caplog):
    tok = tiny_chat.tokenizer
    long_context = [{"role": "user", "content": " ".join(f"w{i}" for i in range(40))}] + TALK[1:2]
    data = tokenize_chat(tok, [long_context], 16, PLAIN_TEMPLATE)
    assert int(data.attention_mask.sum()) == 16
    assert _counted(tok, data) == ["hello", "friend"]  # the response, whole, at the end
    kept = tok.convert_ids_to_tokens(data.input_ids[0].tolist())
    assert kept[-2:] == ["hello", "friend"]
    assert 0 < kept.count("w") < 40  # the context's first words went first
    # A response that does not fit with one token before it is dropped and counted.
    long_answer = [TALK[0], {"role": "assistant", "content": " ".join(["yes"] * 30)}]
    mixed = tokenize_chat(tok, [long_answer, TALK], 16, PLAIN_TEMPLATE, where="train")
    assert len(mixed) == 1 and "dropped 1 of 2 conversations" in caplog.text
    with pytest.raises(DataError, match=r"^max-length: no conversation of train leaves room"):
        tokenize_chat(tok, [long_answer], 16, PLAIN_TEMPLATE, where="train")


def test_prompt_completion_records_are_a_user_turn_and_an_answer():
    assert conversation({"prompt": "2+2?", "completion": "4"}, "f:1") == (
        ("user", "2+2?"),
        ("assistant", "4"),
    )


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, r"f:1: the conversation has no assistant turn"),
        (
            {"messages": [{"role": "bot", "content": "hi"}]},
            r"f:1: message 1 has role 'bot'; a role is one of system, user, assistant",
        ),
        ({"messages": [{"role": "user"}]}, r'f:1: message 1 must be an object with a string "content"'),
        ({"messages": []}, r'f:1: expected \{"messages"'),
        ({"text": "a", "messages": [TALK[1]]}, r"f:1: a record holds both 'text' and 'messages'"),
        ({"prompt": "q"}, r'f:1: "prompt" and "completion" must both be strings'),
        ({"prompt": "q", "completion": "  "}, r'f:1: "completion" is empty'),
    ],
)
def test_a_bad_chat_record_is_named(record, message):
    with pytest.raises(DataError, match=message):
        conversation(record, "f:1")


def test_chat_files_are_read_and_bad_lines_named_without_the_folder(tmp_path):
    good = tmp_path / "train.jsonl"
    good.write_text(
        json.dumps({"messages": TALK}) + "\n" + json.dumps({"prompt": "q", "completion": "a"}) + "\n"
    )
    records = read_jsonl(good, task="chat")
    assert [decode(r["text"]) for r in records] == [
        TALK,
        [TALK[0] | {"content": "q"}, TALK[1] | {"content": "a"}],
    ]
    bad = tmp_path / "test.jsonl"
    bad.write_text(json.dumps({"messages": TALK}) + "\n" + json.dumps({"messages": TALK[:1]}) + "\n")
    with pytest.raises(DataError, match=r"test.jsonl:2: the conversation has no assistant turn") as err:
        read_jsonl(bad, task="chat")
    assert err.value.where == "test.jsonl:2"
    # Chat data under a text task: the record says what it is and what to set.
    with pytest.raises(DataError, match=r"test.jsonl:1: a chat record .* needs task=chat and a causal LM"):
        read_jsonl(bad, task="classification")
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"text": "a", "messages": TALK}) + "\n")
    with pytest.raises(DataError, match=r'both.jsonl:1: a record holds both "text" and chat fields'):
        read_jsonl(both, task="causal-lm")


def test_a_tokenizer_without_a_chat_template_needs_the_plain_one(tiny_chat):
    with pytest.raises(
        DataError, match=r"^chat-template: the tokenizer of model 'tiny-llama' has no chat template"
    ):
        template_for(tiny_chat.tokenizer, "auto", "tiny-llama")
    assert template_for(tiny_chat.tokenizer, "plain", "tiny-llama") == PLAIN_TEMPLATE


def test_a_chat_client_trains_and_measures_response_tokens_only(tmp_path, tiny_chat):
    from fedlora.client.setup import _client_data

    train = [{"messages": TALK}] * 6 + [{"prompt": "how are you", "completion": "fine thanks"}] * 2
    test = [{"prompt": "hi there", "completion": "hello friend"}] * 2
    write_client(tmp_path / "clients" / "alice", train, test)
    cfg = CHAT.replace(data_dir=str(tmp_path / "clients"))
    _, train_data, test_data = _client_data(cfg, cfg.model, 0, 1)
    assert len(train_data) == 8 and len(test_data) == 2
    assert _counted(tiny_chat.tokenizer, test_data) == ["hello", "friend"]
    assert torch.equal(test_data.loss_mask.sum(1), torch.tensor([2, 2]))


@pytest.mark.parametrize("model", ["minilm", "tiny-bert"])
def test_chat_with_a_classification_model_is_refused(model):
    from fedlora.core.errors import ModelError
    from fedlora.models import check_model

    with pytest.raises(ModelError, match=rf"^model: task 'chat' needs a causal LM .* {model!r} is a"):
        check_model(CHAT.replace(model=model).model)


def test_shakespeare_chat_clients_answer_the_cue_before_them_split_in_time():
    from fedlora.data import load_client_data
    from fedlora.data.shakespeare import parse_play
    from fedlora.data.shakespeare_chat import _play_files, chat_roles, exchanges

    role = chat_roles(40)[0]
    talks = exchanges(role.play, role.name)
    spoken = parse_play(_play_files()[role.play].read_text(encoding="utf-8"))
    # Each reply is the first line of one of the role's speeches, after another speaker's line (the cue).
    answers = [
        (spoken[i - 1][1], line)
        for i, (speaker, line) in enumerate(spoken)
        if i and speaker == role.name and spoken[i - 1][0] != role.name
    ]
    assert list(talks) == answers and len(talks) >= 2
    cfg = RunConfig.from_flat({"dataset": "shakespeare-chat", "task": "chat", "test-fraction": 0.2})
    data = load_client_data(cfg.data, "chat", 0, 3, 0)
    held_out = [decode(t) for t in data.test_texts]
    assert len(held_out) == round(len(talks) * 0.2)
    assert [m[1]["content"] for m in held_out] == [reply for _, reply in talks[-len(held_out) :]]
    assert all(m[0]["role"] == "user" and m[1]["role"] == "assistant" for m in held_out)
    with pytest.raises(
        DataError, match=r"^task: dataset 'shakespeare-chat' holds conversations and needs task=chat"
    ):
        load_client_data(cfg.data, "causal-lm", 0, 3, 0)
