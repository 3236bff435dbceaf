"""`fedlora export / predict / generate`: a client's personalized model outside fedlora."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_FEDERATION

from fedlora.cli import main
from fedlora.core.errors import FedloraError
from fedlora.export import client_state_file, export_client, generate, load_personalized, logits

LABELS = "business,entertainment,politics,sports,tech"  # the bundled corpus's topics
# Only transformers: fedlora (and PEFT) are made unimportable in the child interpreter.
PLAIN_SESSION = """
import json, sys
sys.modules["fedlora"] = None
sys.modules["peft"] = None
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
request = json.loads(sys.stdin.read())  # imported first: the caller exports meanwhile
model_dir, max_length, texts = request["model"], request["max_length"], request["texts"]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
preds = []
with torch.no_grad():
    for lo in range(0, len(texts), 32):
        enc = tok(texts[lo:lo + 32], truncation=True, max_length=max_length, padding="longest",
                  return_tensors="pt")
        preds += model(**enc).logits.argmax(-1).tolist()
print(json.dumps([model.config.id2label[p] for p in preds]))
"""


def _round_trip(context, arrays, server_round: int) -> tuple:
    """One round of a client through fedlora's ClientApp: its upload and its evaluation metrics."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from helpers import as_server

    from fedlora.client_app import app
    from fedlora.core import keys

    replies = []
    for kind in ("train", "evaluate"):
        as_server()
        content = RecordDict(
            {keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.C_SERVER_ROUND: server_round})}
        )
        reply = app(Message(content=content, dst_node_id=1, message_type=kind), context)
        assert not reply.has_error(), reply.error
        replies.append(reply)
    return replies[0].content[keys.ARRAYS], replies[1].content.metric_records[keys.METRICS]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    """Three clients, two rounds through fedlora's ClientApp with their state on disk (a client
    folder as `fedlora simulate` keeps it); each round's global adapter is client 0's upload.

    Returns the state folder and every client's personalized accuracy in the last round.
    """
    from flwr.app import Context, RecordDict

    from fedlora.config import RunConfig
    from fedlora.core import keys
    from fedlora.lora.adapters import to_record
    from fedlora.models import build_model

    root = tmp_path_factory.mktemp("export")
    flat = {k.replace("_", "-"): v for k, v in TINY_FEDERATION.items() if k != "clients"}
    cfg = RunConfig.from_flat(
        {**flat, "num-server-rounds": 2, "labels": LABELS, "client-state-dir": str(root / "clients")}
    )
    contexts = [
        Context(
            run_id=1,
            node_id=pid + 1,
            state=RecordDict(),
            run_config=cfg.to_flat(),
            node_config={"partition-id": pid, "num-partitions": 3},
        )
        for pid in range(3)
    ]
    arrays = to_record(build_model(cfg.model, len(cfg.data.labels), seed=0).initial_global)
    for server_round in (1, 2):
        results = [_round_trip(context, arrays, server_round) for context in contexts]
        arrays = results[0][0]
    return root, [float(metrics[keys.M_ACCURACY_PERSONALIZED]) for _, metrics in results]


def test_exported_model_predicts_in_plain_transformers_as_inside_fedlora(finished_run, tmp_path):
    from fedlora.data.federated import load_client_data

    root, scored = finished_run
    client = 1
    # Plain transformers in a process of its own (no fedlora, no PEFT), importing while the export runs.
    proc = subprocess.Popen(
        [sys.executable, "-c", PLAIN_SESSION],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        state = client_state_file(root, client)
        result = export_client(state, tmp_path / "model")
        # Merging the adapters into the base weights changes the logits only by rounding.
        assert result.max_logit_difference < 1e-4

        personalized = load_personalized(state)
        cfg = personalized.cfg
        data = load_client_data(
            cfg.data, cfg.model.task, client, personalized.num_partitions, cfg.federation.seed
        )
        inside = logits(personalized.loaded.model, personalized.held_out()).argmax(-1).tolist()
        request = {"model": str(tmp_path / "model"), "max_length": cfg.model.max_length}
        stdout, stderr = proc.communicate(
            json.dumps({**request, "texts": list(data.test_texts)}), timeout=300
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-2000:]
    plain = json.loads(stdout.strip().splitlines()[-1])
    assert plain == [cfg.data.labels[i] for i in inside]
    # ... and they are the predictions the client scored (and reported to the server) in its last round.
    truth = [cfg.data.labels[i] for i in data.test_labels]
    assert sum(p == t for p, t in zip(plain, truth, strict=True)) / len(truth) == pytest.approx(
        scored[client]
    )


def test_predict_command_reads_texts_and_a_file(finished_run, tmp_path, capsys):
    root, _ = finished_run
    assert main(["export", str(root), "--client", "0", "--out", str(tmp_path / "m")]) == 0
    assert "largest logit difference" in capsys.readouterr().out
    texts = tmp_path / "texts.txt"
    texts.write_text("Shares fell sharply\n\nThe band's new album\n")
    assert main(["predict", str(tmp_path / "m"), "A late goal won the cup", "--file", str(texts)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.split("\t")[0] in LABELS.split(",") for line in lines)
    # A classifier cannot generate, and a missing client is named.
    assert main(["generate", str(tmp_path / "m"), "Once"]) == 2
    assert "fedlora predict" in capsys.readouterr().err
    with pytest.raises(FedloraError, match="client-7.state"):
        client_state_file(root, 7)


def _named_run(root: Path, names: list[str]) -> Path:
    """A run directory whose summary names its clients, with a (stand-in) state file for each."""
    final_round = {name: {"partition": pid, "global_accuracy": 0.5} for pid, name in enumerate(names)}
    root.mkdir()
    (root / "summary.json").write_text(json.dumps({"per_client": {"final_round": final_round}}))
    for pid in range(len(names)):
        (root / "clients" / "federation-1").mkdir(parents=True, exist_ok=True)
        (root / "clients" / "federation-1" / f"client-{pid}.state").write_bytes(b"")
    return root


def test_export_takes_a_client_s_name_or_its_number(tmp_path):
    run = _named_run(tmp_path / "run", ["alice", "bob", "7"])
    assert client_state_file(run, "bob").name == "client-1.state"
    assert client_state_file(run, "7").name == "client-2.state"  # a name before a number
    assert client_state_file(run, "0").name == "client-0.state"
    assert client_state_file(run, 1).name == "client-1.state"


def test_export_refuses_an_unknown_client_in_one_line_naming_the_clients(tmp_path, capsys):
    run = _named_run(tmp_path / "run", ["alice", "bob"])
    assert main(["export", str(run), "--client", "carol", "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err == (
        f"fedlora: error: client: no client named 'carol' in {run}; its clients: alice, bob; "
        "or give a partition number\n"
    )
    many = _named_run(tmp_path / "many", [f"user{i}" for i in range(12)])
    with pytest.raises(FedloraError) as refused:
        client_state_file(many, "carol")
    assert str(refused.value).endswith(
        "its 12 clients include user0, user1, user2, user3, user4, user5, user6, user7, ... "
        "(all in summary.json); or give a partition number"
    )
    assert not (tmp_path / "m").exists()


def _device_round(tmp_path, flat, train, test):
    """One round of a deployed device through the ClientApp: its own folder, its state on its disk."""
    from conftest import write_client
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from helpers import as_server

    from fedlora.client_app import app
    from fedlora.config import RunConfig
    from fedlora.core import keys
    from fedlora.lora.adapters import to_record
    from fedlora.models import build_model

    write_client(tmp_path / "device", train, test)
    cfg = RunConfig.from_flat({"max-length": 16, "local-steps": 2, "personal-steps": 2, **flat})
    node = {"data-dir": str(tmp_path / "device"), "state-dir": str(tmp_path / "state")}
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config=cfg.to_flat(), node_config=node)
    arrays = to_record(build_model(cfg.model, 0, seed=0).initial_global)
    for kind in ("train", "evaluate"):
        as_server()
        content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.C_SERVER_ROUND: 1})})
        reply = app(Message(content=content, dst_node_id=7, message_type=kind), context)
        assert not reply.has_error(), reply.error
        # A device is named by its node id on the server, not by a partition id of its own folder.
        assert keys.M_PARTITION_ID not in reply.content.metric_records[keys.METRICS]
    return client_state_file(tmp_path / "state")


def test_a_devices_causal_lm_exports_and_generates(tmp_path, capsys):
    state_file = _device_round(
        tmp_path,
        {"model": "tiny-llama", "task": "causal-lm"},
        [{"text": f"the song band guitar {n} is good"} for n in range(16)],
        [{"text": f"the song band guitar x{n} is good"} for n in range(4)],
    )
    # In fedlora: the personalized model, the global one it was evaluated against, and back.
    personalized = load_personalized(state_file)
    held_out = personalized.held_out()
    mine = logits(personalized.loaded.model, held_out)
    personalized.use_global()
    assert (logits(personalized.loaded.model, held_out) - mine).abs().max() > 1e-4
    continued = personalized.generate("the song", max_new_tokens=5)
    assert (logits(personalized.loaded.model, held_out) - mine).abs().max() == 0

    result = export_client(state_file, tmp_path / "lm")
    assert result.task == "causal-lm" and result.max_logit_difference < 1e-4
    assert generate(tmp_path / "lm", "the song", max_new_tokens=5) == continued
    assert main(["generate", str(tmp_path / "lm"), "the song", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the song")
    assert main(["predict", str(tmp_path / "lm"), "the song"]) == 2
    assert "fedlora generate" in capsys.readouterr().err


def test_an_exported_chat_model_answers_with_its_template_as_inside_fedlora(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.train.chat import PLAIN_TEMPLATE

    talk = [{"prompt": f"what is {n}", "completion": f"it is {n} and good"} for n in range(16)]
    state_file = _device_round(
        tmp_path,
        {"model": "tiny-llama", "task": "chat", "chat-template": "plain", "max-length": 24},
        talk,
        talk[:4],
    )
    personalized = load_personalized(state_file)
    assert len(personalized.held_out()) == 4  # conversations, rendered and masked as in training
    reply = personalized.generate("what is 3", max_new_tokens=6)
    assert reply and reply == personalized.generate(
        [{"role": "user", "content": "what is 3"}], max_new_tokens=6
    )
    assert personalized.generate("what is 3", max_new_tokens=6, chat=False) != reply  # raw text, no template

    result = export_client(state_file, tmp_path / "chat")
    assert result.task == "chat" and result.max_logit_difference < 1e-4
    # transformers alone: the tokenizer carries the plain template the client trained with.
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "chat"))
    assert tokenizer.chat_template == PLAIN_TEMPLATE
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "what is 3"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "### User:\nwhat is 3\n\n### Assistant:\n"
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "chat"))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=6, do_sample=False, no_repeat_ngram_size=3)
    assert tokenizer.decode(out[0][ids.shape[1] :], skip_special_tokens=True).strip() == reply
    assert generate(tmp_path / "chat", "what is 3", max_new_tokens=6) == reply
    assert main(["generate", str(tmp_path / "chat"), "what is 3", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == f"user: what is 3\nassistant: {reply}\n"
