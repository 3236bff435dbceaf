"""`fedlora export / predict / generate`: a client's personalized model outside fedlora."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_FEDERATION

import fedlora
from fedlora.cli import main
from fedlora.errors import FedloraError
from fedlora.export import client_state_file, export_client, load_personalized, logits

# Only transformers: fedlora (and PEFT) are made unimportable in the child interpreter.
PLAIN_SESSION = """
import json, sys
sys.modules["fedlora"] = None
sys.modules["peft"] = None
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model_dir, max_length = sys.argv[1], int(sys.argv[2])
texts = json.loads(sys.stdin.read())
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


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "run"
    fedlora.run(**TINY_FEDERATION, rounds=2, out=out)
    return out


def test_exported_model_predicts_in_plain_transformers_as_inside_fedlora(finished_run, tmp_path):
    from fedlora.data.federated import load_client_data

    client = 1
    state = client_state_file(finished_run, client)
    result = export_client(state, tmp_path / "model")
    # Merging the adapters into the base weights changes the logits only by rounding.
    assert result.max_logit_difference < 1e-4

    personalized = load_personalized(state)
    cfg = personalized.cfg
    data = load_client_data(
        cfg.data, cfg.model.task, client, personalized.num_partitions, cfg.federation.seed
    )
    inside = logits(personalized.loaded.model, personalized.held_out()).argmax(-1).tolist()
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_SESSION, str(tmp_path / "model"), str(cfg.model.max_length)],
        input=json.dumps(list(data.test_texts)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    assert plain == [cfg.data.labels[i] for i in inside]
    # ... and they are the predictions the federation scored for this client.
    summary = json.loads((finished_run / "summary.json").read_text())
    scored = summary["per_client"]["final_round"][str(client)]["personalized_accuracy"]
    truth = [cfg.data.labels[i] for i in data.test_labels]
    assert sum(p == t for p, t in zip(plain, truth, strict=True)) / len(truth) == pytest.approx(scored)


def test_predict_command_reads_texts_and_a_file(finished_run, tmp_path, capsys):
    assert main(["export", str(finished_run), "--client", "0", "--out", str(tmp_path / "m")]) == 0
    assert "largest logit difference" in capsys.readouterr().out
    texts = tmp_path / "texts.txt"
    texts.write_text("Shares fell sharply\n\nThe band's new album\n")
    assert main(["predict", str(tmp_path / "m"), "A late goal won the cup", "--file", str(texts)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    labels = json.loads((finished_run / "config.json").read_text())["labels"].split(",")
    assert len(lines) == 3 and all(line.split("\t")[0] in labels for line in lines)
    # A classifier cannot generate, and a missing client is named.
    assert main(["generate", str(tmp_path / "m"), "Once"]) == 2
    assert "fedlora predict" in capsys.readouterr().err
    with pytest.raises(FedloraError, match="client-7.state"):
        client_state_file(finished_run, 7)
