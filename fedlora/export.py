"""Export a client's personalized model as a plain transformers model, and use it.

A client's state file (`fedlora.client.state`) holds everything needed: its effective
configuration, the server's last global arrays and its personal state. The export
rebuilds the personalized model exactly as the client evaluates it, merges every active
LoRA delta (and any base-weight update the strategy sent) into the base weights, and
saves the result with ``save_pretrained``: it loads with ``AutoModelFor...`` alone.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.client.state import read_state
from fedlora.config import CAUSAL_TASKS, RunConfig
from fedlora.core import keys
from fedlora.core.errors import DataError, FedloraError
from fedlora.core.rundir import RESPONSE_CLIENTS, SUMMARY, RunSummary
from fedlora.data import client_names
from fedlora.data.chat import decode
from fedlora.data.federated import load_client_data
from fedlora.lora.adapters import from_record
from fedlora.lora.protocol import receive
from fedlora.models import build_model
from fedlora.personalization import get_personalization
from fedlora.personalization.base import Local
from fedlora.plan import load as load_plan
from fedlora.plan import resolved_personalization
from fedlora.train.chat import PLAIN_TEMPLATE, chat_prompt, template_for
from fedlora.train.local import use_adapter
from fedlora.train.loops import model_inputs
from fedlora.train.splits import tokenize_split

if TYPE_CHECKING:
    from fedlora.data import ClientData
    from fedlora.models import LoadedModel
    from fedlora.train import Tokenized

__all__ = [
    "ExportResult",
    "Personalized",
    "client_state_file",
    "chat_reply",
    "client_partition",
    "continuation",
    "export_client",
    "generate",
    "load_personalized",
    "logits",
    "model_task",
    "predict",
    "write_responses",
]

EXPORT_INFO = "fedlora_export.json"
# Generation never repeats an n-gram of this length.
NO_REPEAT_NGRAM = 3
# An unknown client's error lists the accepted names, or this many of them.
LISTED_NAMES = 8


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


def client_partition(run_dir: str | Path, client: str) -> int:
    """The partition id of the client that ``client`` names in a run directory.

    ``client`` is the client's name in the run's results (``summary.json``, `fedlora.api.Results.per_client`)
    or, where no client has that name, its partition id written as a number.

    Raises
    ------
    FedloraError
        One line: no client has that name, listing the accepted names (a few, and how many,
        where there are many).

    """
    run_dir = Path(run_dir).expanduser()
    summary = run_dir / SUMMARY
    partitions = RunSummary.read(run_dir).per_client.partitions() if summary.is_file() else {}
    if client in partitions:
        return partitions[client]
    if client.isascii() and client.isdigit():
        return int(client)
    if not partitions:
        raise FedloraError(
            f"client: no client named {client!r}: {run_dir} has no {SUMMARY} to read its clients' names "
            "from; give the client's number"
        )
    names = list(partitions)
    if len(names) <= LISTED_NAMES:
        accepted = f"its clients: {', '.join(names)}"
    else:
        shown = ", ".join(names[:LISTED_NAMES])
        accepted = f"its {len(names):,} clients include {shown}, ... (all in {SUMMARY})"
    raise FedloraError(
        f"client: no client named {client!r} in {run_dir}; {accepted}; or give a partition number"
    )


def client_state_file(source: str | Path, client: int | str | None = None) -> Path:
    """The state file of ``client`` in a run directory, or ``source`` itself if it is a file.

    ``client`` is a partition id, or a client's name or number as `client_partition`
    reads it; None: client 0.

    Raises
    ------
    FedloraError
        If there is no such client or state, naming what was looked for.

    """
    source = Path(source).expanduser()
    if source.is_file():
        return source
    if isinstance(client, str):
        client = client_partition(source, client)
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

    def generate(
        self,
        prompt: str | Sequence[Mapping[str, str]],
        *,
        personalized: bool = True,
        max_new_tokens: int = 40,
        chat: bool | None = None,
    ) -> str:
        """The personalized (or the global) model's greedy answer to ``prompt``.

        With ``chat`` (the default for a ``task=chat`` model), ``prompt`` is the user's turn,
        or a whole conversation (``[{"role": ..., "content": ...}, ...]``), rendered by the
        client's chat template with the generation prompt; the reply is returned without
        it. Otherwise ``prompt`` is text and its continuation is returned.
        """
        if not self.cfg.model.causal:
            raise FedloraError(f"generate: client {self.partition_id} has a {self.cfg.model.task} model")
        if personalized:
            self.use_personalized()
        else:
            self.use_global()
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        if chat if chat is not None else self.cfg.model.task == "chat":
            template = template_for(tokenizer, self.cfg.model.chat_template, self.cfg.model.model)
            return chat_reply(model, tokenizer, prompt, template, max_new_tokens=max_new_tokens)
        if not isinstance(prompt, str):
            raise FedloraError("generate: a conversation needs chat=True")
        return continuation(model, tokenizer, prompt, max_new_tokens=max_new_tokens)

    def data(self) -> ClientData | None:
        """The client's examples (its folder, or its part of the bundled corpus), None if not at hand."""
        cfg = self.cfg
        try:
            return load_client_data(
                cfg.data, cfg.model.task, self.partition_id, self.num_partitions, cfg.federation.data_seed
            )
        except DataError:
            return None

    def held_out(self) -> Tokenized | None:
        """The client's tokenized held-out examples, or None where its data is not at hand."""
        data = self.data()
        if data is None:
            return None
        return tokenize_split(
            self.loaded.tokenizer, self.cfg.model, data.test_texts, data.test_labels, where="test"
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
    if cfg.model.task == "chat" and cfg.model.chat_template == "plain":
        # The template the client trained with travels in the tokenizer: transformers applies it alone.
        loaded.tokenizer.chat_template = PLAIN_TEMPLATE
    loaded.tokenizer.save_pretrained(str(out_dir))
    info = {
        "task": cfg.model.task,
        "labels": list(labels),
        "max_length": cfg.model.max_length,
        "chat_template": cfg.model.chat_template if cfg.model.task == "chat" else None,
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


def write_responses(state_dir: Path, out_file: Path, per_client: int, *, max_new_tokens: int = 40) -> int:
    """The global and the personalized model's replies to each client's first held-out prompts.

    For each of the first `RESPONSE_CLIENTS` clients with a state file under
    ``state_dir`` (a simulation's ``client-state-dir``), the first ``per_client``
    conversations of its held-out split: everything before the last assistant turn is the
    prompt, that turn is the reference. One JSON line per prompt goes to ``out_file``
    (``client``: the client's name, `fedlora.data.client_names`; ``partition``: its
    partition id; ``prompt``, ``reference``, ``global``, ``personalized``), written whole
    at the end; returns how many.

    This reads the clients' own state and data, so it is for simulations, where both are
    on this machine: in a deployment nothing but the adapter deltas leaves a device.
    """
    numbered = [f for f in state_dir.glob("federation-*/client-*.state") if f.stem[7:].isdigit()]
    files = sorted(numbered, key=lambda f: int(f.stem[7:]))[:RESPONSE_CLIENTS]  # after "client-"
    rows = []
    for state_file in files:
        personalized = load_personalized(state_file)
        cfg = personalized.cfg
        data = load_client_data(
            cfg.data,
            cfg.model.task,
            personalized.partition_id,
            personalized.num_partitions,
            cfg.federation.data_seed,
        )
        names = client_names(cfg.data, cfg.model.task, personalized.num_partitions, cfg.federation.data_seed)
        for text in data.test_texts[:per_client]:
            messages = decode(text)
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = messages[:last]
            rows.append(
                {
                    "client": names[personalized.partition_id],
                    "partition": personalized.partition_id,
                    "prompt": prompt,
                    "reference": messages[last]["content"],
                    **{
                        model: personalized.generate(
                            prompt, personalized=model == "personalized", max_new_tokens=max_new_tokens
                        )
                        for model in ("global", "personalized")
                    },
                }
            )
    tmp = out_file.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(out_file)
    return len(rows)


def _info(model_dir: Path) -> dict[str, Any]:
    path = model_dir.expanduser() / EXPORT_INFO
    if not path.is_file():
        raise FedloraError(f"{model_dir}: not a model written by `fedlora export` (no {EXPORT_INFO})")
    info: dict[str, Any] = json.loads(path.read_text())
    return info


def model_task(model_dir: Path) -> str:
    """The task an exported model was trained for (``classification``, ``causal-lm`` or ``chat``)."""
    return str(_info(model_dir)["task"])


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


def generate(
    model_dir: Path, prompt: str, *, max_new_tokens: int = 40, seed: int = 0, chat: bool | None = None
) -> str:
    """An exported causal LM's greedy answer to ``prompt``, with transformers alone.

    With ``chat`` (the default for a ``task=chat`` model) the prompt is the user's turn,
    rendered by the chat template saved with the model's tokenizer, and the reply is
    returned (`chat_reply`); otherwise the continuation of the text (`continuation`).

    Raises
    ------
    FedloraError
        If the folder is not an exported causal LM, or ``chat`` is asked of a tokenizer
        without a chat template.

    """
    import torch  # noqa: PLC0415 - heavy: torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - heavy: transformers

    info = _info(model_dir)
    if info["task"] not in CAUSAL_TASKS:
        raise FedloraError(f"{model_dir}: a {info['task']} model; use `fedlora predict`")
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    if chat if chat is not None else info["task"] == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise FedloraError(f"{model_dir}: the tokenizer has no chat template; generate without --chat")
        return chat_reply(model, tokenizer, prompt, None, max_new_tokens=max_new_tokens)
    return continuation(model, tokenizer, prompt, max_new_tokens=max_new_tokens)


def chat_reply(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[Mapping[str, str]],
    template: str | None,
    *,
    max_new_tokens: int = 40,
) -> str:
    """The assistant's greedy reply to a user turn (or to a conversation), by a causal LM.

    The conversation is rendered by ``template`` (None: the tokenizer's own) with the
    generation prompt, exactly as training rendered what came before each answer, and
    generation stops at the end-of-sequence token.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    text = chat_prompt(tokenizer, messages, template)
    return continuation(model, tokenizer, text, max_new_tokens=max_new_tokens, special_tokens=False).strip()


def continuation(
    model: Any, tokenizer: Any, prompt: str, *, max_new_tokens: int = 40, special_tokens: bool = True
) -> str:
    """The greedy continuation of ``prompt`` (without the prompt) by a causal LM, PEFT or plain.

    Greedy decoding that never repeats a 3-gram (small models otherwise loop on one
    phrase): deterministic, so a model always gives the same continuation. Without
    ``special_tokens`` the tokenizer adds none (a rendered chat prompt has its own).
    """
    import torch  # noqa: PLC0415 - heavy: torch

    model.eval()
    enc = tokenizer(
        prompt, return_tensors="pt", return_token_type_ids=False, add_special_tokens=special_tokens
    )
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            no_repeat_ngram_size=NO_REPEAT_NGRAM,
            pad_token_id=tokenizer.pad_token_id,
        )
    return str(tokenizer.decode(out[0][enc["input_ids"].shape[1] :], skip_special_tokens=True))
