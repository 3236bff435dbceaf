"""Export a client's personalized model as a plain transformers model, and use it.

A client's state file (`fedlora.client.state`) holds everything needed: its effective
configuration, the server's last global arrays and its personal state. The export
rebuilds the personalized model exactly as the client evaluates it, merges every active
LoRA delta (and any base-weight update the strategy sent) into the base weights, and
saves the result with ``save_pretrained``: it loads with ``AutoModelFor...`` alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.config import CAUSAL_TASKS, RunConfig
from fedlora.core import keys
from fedlora.core.errors import FedloraError
from fedlora.plan import load as load_plan
from fedlora.plan import resolved_personalization

if TYPE_CHECKING:
    from fedlora.models import LoadedModel
    from fedlora.train import Tokenized
import dataclasses

from fedlora.client.state import read_state
from fedlora.core.errors import DataError
from fedlora.data.federated import load_client_data
from fedlora.lora.adapters import from_record
from fedlora.lora.protocol import receive
from fedlora.models import build_model
from fedlora.personalization import get_personalization
from fedlora.personalization.base import Local
from fedlora.train import tokenize
from fedlora.train.local import use_adapter
from fedlora.train.loops import model_inputs

__all__ = [
    "ExportResult",
    "Personalized",
    "client_state_file",
    "continuation",
    "export_client",
    "generate",
    "load_personalized",
    "logits",
    "predict",
]

EXPORT_INFO = "fedlora_export.json"
# Generation never repeats an n-gram of this length.
NO_REPEAT_NGRAM = 3


@dataclass(frozen=True)
class ExportResult:
    """Where the model went, and how closely the merged model matches the client's own."""

    out_dir: Path
    task: str
    labels: tuple[str, ...]
    # Largest |logit| difference between the merged model and the client's personalized
    # model on the client's held-out examples (NaN when the client's data is not at hand).
    max_logit_difference: float
    accuracy: float


def client_state_file(source: str | Path, client: int | None = None) -> Path:
    """The state file of ``client`` in a run directory, or ``source`` itself if it is a file.

    Raises
    ------
    FedloraError
        If there is no such state, naming what was looked for.

    """
    source = Path(source).expanduser()
    if source.is_file():
        return source
    folder = source / "clients" if (source / "clients").is_dir() else source
    name = f"client-{client if client is not None else 0}.state"
    found = sorted(folder.glob(f"federation-*/{name}")) + sorted(folder.glob(name))
    if not found:
        raise FedloraError(
            f"{source}: no client state {name!r} (expected a run directory with clients/, "
            "a device's state-dir, or a .state file); did the run finish a round?"
        )
    if len(found) > 1:
        listed = ", ".join(str(p.parent.name) for p in found)
        raise FedloraError(f"{source}: {name} belongs to several federations ({listed}); give the file")
    return found[0]


@dataclass
class Personalized:
    """A client's personalized model rebuilt from its state, as the client evaluates it."""

    loaded: LoadedModel
    cfg: RunConfig
    partition_id: int
    num_partitions: int
    personal_rounds: int
    # The global adapter the client last received, and how to go back to its personalized model.
    global_state: Mapping[str, Any] = field(default_factory=dict, repr=False)
    _prepare: Callable[[], None] | None = field(default=None, repr=False)

    def use_global(self) -> None:
        """Make the model the global one, as the client evaluated it (its ``global`` metrics)."""
        use_adapter(self.loaded, self.global_state)

    def use_personalized(self) -> None:
        """Make the model the client's personalized one again (as it is when loaded)."""
        if self._prepare is not None:
            self._prepare()

    def generate(self, prompt: str, *, personalized: bool = True, max_new_tokens: int = 40) -> str:
        """A greedy continuation of ``prompt`` by the personalized (or the global) model."""
        if not self.cfg.model.causal:
            raise FedloraError(f"generate: client {self.partition_id} has a {self.cfg.model.task} model")
        if personalized:
            self.use_personalized()
        else:
            self.use_global()
        return continuation(self.loaded.model, self.loaded.tokenizer, prompt, max_new_tokens=max_new_tokens)

    def held_out(self) -> Tokenized | None:
        """The client's tokenized held-out examples, or None where its data is not at hand."""
        cfg = self.cfg
        try:
            data = load_client_data(
                cfg.data, cfg.model.task, self.partition_id, self.num_partitions, cfg.federation.seed
            )
        except DataError:
            return None
        classify = cfg.model.task == "classification"
        return tokenize(
            self.loaded.tokenizer,
            data.test_texts,
            data.test_labels if classify else None,
            cfg.model.max_length,
        )


def load_personalized(state_file: str | Path) -> Personalized:
    """Rebuild the personalized model of the client whose state is ``state_file``.

    Raises
    ------
    FedloraError
        If the state lacks what is needed (the client never evaluated a round).

    """
    state = read_state(Path(state_file).expanduser())
    if keys.S_LAST_GLOBAL not in state.array_records or keys.S_CLIENT_CONFIG not in state.config_records:
        raise FedloraError(f"{state_file}: the client has not evaluated a round yet; nothing to export")
    flat: dict[str, Any] = dict(state.config_records[keys.S_CLIENT_CONFIG])
    partition_id = int(flat.pop(keys.NODE_PARTITION_ID))
    num_partitions = int(flat.pop(keys.NODE_NUM_PARTITIONS))
    rank = int(flat.pop("client-rank"))
    planned = load_plan(flat)
    cfg = planned.cfg
    if cfg.model.task == "classification" and not cfg.data.labels:
        raise FedloraError(f"{state_file}: the run config has no labels; cannot name the classes")
    model_cfg = dataclasses.replace(cfg.model, lora_rank=rank, client_ranks=())
    loaded = build_model(model_cfg, len(cfg.data.labels), seed=cfg.federation.seed)
    kept = state.array_records.get(keys.S_KEPT)
    view = receive(
        planned.strategy.protocol,
        from_record(state.array_records[keys.S_LAST_GLOBAL]),
        loaded.initial_global,
        from_record(kept) if kept is not None else None,
        alpha=cfg.model.lora_alpha,
    )
    loaded.set_base_delta(view.base_delta)
    personal = state.array_records.get(keys.S_PERSONAL)
    local = Local(loaded, None, None, view, cfg.train, seed=0)  # type: ignore[arg-type]
    method = get_personalization(planned.personalization_name)
    stored = from_record(personal) if personal is not None else None
    method.prepare(local, stored)
    rounds = state.config_records.get(keys.S_PERSONAL_ROUNDS)
    return Personalized(
        loaded,
        cfg,
        partition_id,
        num_partitions,
        int(rounds["rounds"]) if rounds else 0,  # type: ignore[arg-type]
        global_state=view.global_state,
        _prepare=lambda: method.prepare(local, stored),
    )


def export_client(state_file: Path, out_dir: Path, *, verify: bool = True) -> ExportResult:
    """Write the personalized model of the client whose state is ``state_file``.

    With ``verify``, the client's held-out examples (if its data folder or the bundled
    corpus is at hand) are run through both the personalized model and the merged one.

    Raises
    ------
    FedloraError
        If the state lacks what the export needs (the client never evaluated a round).

    """
    personalized = load_personalized(state_file)
    cfg, loaded = personalized.cfg, personalized.loaded
    labels = cfg.data.labels
    test = personalized.held_out() if verify else None
    before = logits(loaded.model, test) if test is not None else None
    merged = loaded.model.merge_and_unload()
    merged.eval()
    difference, accuracy = math.nan, math.nan
    if test is not None and before is not None:
        after = logits(merged, test)
        difference = float((after - before).abs().max())
        if test.labels is not None:
            accuracy = float((after.argmax(-1) == test.labels).float().mean())
    if labels:
        merged.config.id2label = dict(enumerate(labels))
        merged.config.label2id = {label: i for i, label in enumerate(labels)}
    out_dir = out_dir.expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir))
    loaded.tokenizer.save_pretrained(str(out_dir))
    info = {
        "task": cfg.model.task,
        "labels": list(labels),
        "max_length": cfg.model.max_length,
        "strategy": cfg.federation.strategy,
        "personalization": resolved_personalization(cfg),
        "client": personalized.partition_id,
        "personal_rounds": personalized.personal_rounds,
        "max_logit_difference": difference,
        "held_out_accuracy": accuracy,
    }
    (out_dir / EXPORT_INFO).write_text(json.dumps(info, indent=2))
    return ExportResult(out_dir, cfg.model.task, labels, difference, accuracy)


def logits(model: Any, data: Any, batch_size: int = 32) -> Any:
    """Logits on every example (causal LM: at every real token), batch by batch."""
    import torch  # noqa: PLC0415 - heavy: torch

    model.eval()
    outs = []
    with torch.no_grad():
        for lo in range(0, len(data), batch_size):
            batch = data.batch(range(lo, min(lo + batch_size, len(data))))
            batch.pop("labels", None)
            logits = model(**model_inputs(batch)).logits
            outs.append(logits[batch["attention_mask"].bool()] if logits.dim() == 3 else logits)
    return torch.cat(outs)


def _info(model_dir: Path) -> dict[str, Any]:
    path = model_dir.expanduser() / EXPORT_INFO
    if not path.is_file():
        raise FedloraError(f"{model_dir}: not a model written by `fedlora export` (no {EXPORT_INFO})")
    info: dict[str, Any] = json.loads(path.read_text())
    return info


def predict(model_dir: Path, texts: Sequence[str]) -> list[tuple[str, float]]:
    """(label, probability) of each text under an exported classifier, with transformers alone."""
    import torch  # noqa: PLC0415 - heavy: torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: PLC0415 - heavy: transformers

    info = _info(model_dir)
    if info["task"] != "classification":
        raise FedloraError(f"{model_dir}: a {info['task']} model; use `fedlora generate`")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    enc = tokenizer(
        list(texts), truncation=True, max_length=info["max_length"], padding="longest", return_tensors="pt"
    )
    with torch.no_grad():
        probs = model(**enc).logits.softmax(-1)
    best = probs.argmax(-1).tolist()
    return [(model.config.id2label[i], float(probs[row, i])) for row, i in enumerate(best)]


def generate(model_dir: Path, prompt: str, *, max_new_tokens: int = 40, seed: int = 0) -> str:
    """A continuation of ``prompt`` from an exported causal LM (greedy, see `continuation`)."""
    import torch  # noqa: PLC0415 - heavy: torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - heavy: transformers

    info = _info(model_dir)
    if info["task"] not in CAUSAL_TASKS:
        raise FedloraError(f"{model_dir}: a {info['task']} model; use `fedlora predict`")
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    return continuation(model, tokenizer, prompt, max_new_tokens=max_new_tokens)


def continuation(model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 40) -> str:
    """The greedy continuation of ``prompt`` (without the prompt) by a causal LM, PEFT or plain.

    Greedy decoding that never repeats a 3-gram (small models otherwise loop on one
    phrase): deterministic, so a model always gives the same continuation.
    """
    import torch  # noqa: PLC0415 - heavy: torch

    model.eval()
    enc = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            no_repeat_ngram_size=NO_REPEAT_NGRAM,
            pad_token_id=tokenizer.pad_token_id,
        )
    return str(tokenizer.decode(out[0][enc["input_ids"].shape[1] :], skip_special_tokens=True))
