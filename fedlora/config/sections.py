"""The five sections of a run configuration: frozen dataclasses whose checks name the field."""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass

from fedlora.config.fields import fail, key, setting
from fedlora.core.errors import ConfigError

__all__ = [
    "BASE_DTYPES",
    "CLIENT_DP_MODES",
    "LR_SCHEDULES",
    "PRECISIONS",
    "QUANTIZATIONS",
    "DP_ACCOUNTANTS",
    "CAUSAL_TASKS",
    "TASKS",
    "HF_PREFIX",
    "DataConfig",
    "FederationConfig",
    "ModelConfig",
    "PrivacyConfig",
    "TrainConfig",
]

TASKS = ("classification", "causal-lm", "chat")
# Tasks trained with a next-token loss on a causal LM (`chat`: on the assistant's tokens only).
CAUSAL_TASKS = ("causal-lm", "chat")
# Client-level DP: where each client's whole update is clipped before the server adds noise.
CLIENT_DP_MODES = ("off", "server-clipping", "client-clipping")
# Compute placement and number formats (`fedlora.models.device`).
BASE_DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "8bit", "4bit")
PRECISIONS = ("fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")
PERSONAL_MIXES = ("off", "validation")
# Opacus accountants a client's privacy ledger can use.
DP_ACCOUNTANTS = ("rdp", "prv")
# Upper bounds that catch a typo (an extra zero) before it costs a run. The rank is also
# checked against the model's own layer sizes (`fedlora.models.check_model`).
MAX_RANK, MAX_LENGTH, MAX_BATCH, MAX_STEPS, MAX_ROUNDS = 1024, 32_768, 4096, 100_000, 100_000
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")
# ``dataset=hf:NAME``: a Hugging Face dataset (a hub id or a local path), read by `fedlora.data.hf`.
HF_PREFIX = "hf:"


def _require_module(module: str, key: str, install: str) -> None:
    """Fail before any training when ``key`` needs a package that is not installed."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{key}: needs the package {install}; {module!r} is not installed")


@dataclass(frozen=True)
class ModelConfig:
    """Base model and LoRA adapter shape.

    ``model`` is a bundled name (``minilm``, ``smollm2``, ``tiny-bert``, ``tiny-llama``), a
    local folder or a Hugging Face hub id. An empty ``lora_target_modules`` picks the
    architecture's default (attention query/value projections).
    """

    model: str = setting(
        "minilm",
        "`minilm` (bundled all-MiniLM-L6-v2), `smollm2` (bundled SmolLM2-135M-Instruct, causal LM; "
        "converted once from the package's GGUF to a safetensors copy in `~/.cache/fedlora` or "
        "`$FEDLORA_CACHE`, about 20 s and 540 MB), `tiny-bert` / `tiny-llama` (random tiny models for "
        "tests), a local model folder, or a Hugging Face hub id",
        identity=True,
    )
    task: str = setting(
        "classification",
        "`classification`, `causal-lm` (next-token loss; accuracy is next-token accuracy) or `chat` "
        "(conversations or prompt-completion records: the next-token loss on the assistant's tokens only)",
        identity=True,
    )
    chat_template: str = setting(
        "auto",
        "`chat`: `auto` (the tokenizer's own chat template), or `plain` (fedlora's plain template, "
        "see [Chat and instruction data](#chat-and-instruction-data))",
        identity=True,
    )
    max_length: int = setting(32, "tokens per example (longer texts are truncated)")
    lora_rank: int = setting(8, "LoRA rank r of both adapters", identity=True)
    lora_alpha: int = setting(16, "LoRA scaling alpha (the update is scaled by alpha / r)", identity=True)
    lora_dropout: float = setting(0.0, "dropout on the LoRA input")
    lora_target_modules: tuple[str, ...] = setting(
        (),
        "comma-separated module names to adapt, or `all-linear` (every linear layer but the output head); "
        "empty: per architecture (BERT classifiers: `query,value,pooler.dense`; otherwise PEFT's default, "
        "an error naming the model where PEFT has none)",
        identity=True,
    )
    client_ranks: tuple[str, ...] = setting(
        (),
        "comma-separated LoRA ranks taken by clients in turn (`flora`, `flexlora` only); empty: `lora-rank` "
        "for all",
        identity=True,
    )
    device: str = setting(
        "auto",
        "where the model, its batches and evaluation run: `auto` (CUDA, then Apple MPS, then the CPU), "
        "`cpu`, `cuda`, `cuda:N`, `mps`; a deployed node's own `device` node config wins. Adapters are "
        "exchanged and stored as float32 CPU tensors whatever the device",
        resumable=True,
    )
    base_dtype: str = setting(
        "float32",
        "dtype of the frozen base weights: `float32`, `bfloat16` (half the memory, also on the CPU), "
        "`float16` (GPU only); the LoRA adapters and the task head stay float32",
    )
    quantization: str = setting(
        "none",
        "a quantized frozen base on CUDA (bitsandbytes): `none`, `8bit` (LLM.int8), `4bit` (NF4 with double "
        "quantization, QLoRA-style); adapters stay float32",
    )
    precision: str = setting(
        "fp32",
        "compute precision of training and evaluation: `fp32`, `bf16` (autocast; CPU or GPU), `fp16` "
        "(autocast with a gradient scaler; GPU only)",
    )
    gradient_checkpointing: bool = setting(
        False, "recompute activations in the backward pass instead of keeping them (less memory, more time)"
    )

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise fail("model", "a bundled model name, a local folder or a hub id", self.model)
        if self.task not in TASKS:
            raise fail("task", f"one of {', '.join(TASKS)}", self.task)
        if self.chat_template not in ("auto", "plain"):
            raise fail("chat-template", "auto or plain", self.chat_template)
        if not 4 <= self.max_length <= MAX_LENGTH:
            raise fail("max-length", f"an integer in [4, {MAX_LENGTH}]", self.max_length)
        if self.lora_rank <= 0:
            raise fail("lora-rank", "a positive integer", self.lora_rank)
        if self.lora_rank > MAX_RANK:
            raise fail("lora-rank", f"an integer in [1, {MAX_RANK}]", self.lora_rank)
        if not 0 < self.lora_alpha <= MAX_RANK * 16:
            raise fail("lora-alpha", f"an integer in [1, {MAX_RANK * 16}]", self.lora_alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise fail("lora-dropout", "a number in [0, 1)", self.lora_dropout)
        if not all(r.isdigit() and 0 < int(r) <= MAX_RANK for r in self.client_ranks):
            raise fail("client-ranks", "comma-separated positive integers", ",".join(self.client_ranks))
        if not _DEVICE.fullmatch(self.device):
            raise fail("device", "auto, cpu, cuda, cuda:N or mps", self.device)
        if self.base_dtype not in BASE_DTYPES:
            raise fail("base-dtype", f"one of {', '.join(BASE_DTYPES)}", self.base_dtype)
        if self.quantization not in QUANTIZATIONS:
            raise fail("quantization", f"one of {', '.join(QUANTIZATIONS)}", self.quantization)
        if self.precision not in PRECISIONS:
            raise fail("precision", f"one of {', '.join(PRECISIONS)}", self.precision)

    @property
    def causal(self) -> bool:
        """Whether the task trains a causal LM (`causal-lm`, `chat`)."""
        return self.task in CAUSAL_TASKS

    def ranks(self) -> list[int]:
        """Every LoRA rank in use: ``client-ranks`` if given, else ``lora-rank``."""
        return [int(r) for r in self.client_ranks] or [self.lora_rank]

    def rank_for(self, partition_id: int) -> int:
        """Client ``partition_id``'s rank: ``client-ranks`` taken in turn, else ``lora-rank``."""
        ranks = self.ranks()
        return ranks[partition_id % len(ranks)]


@dataclass(frozen=True)
class DataConfig:
    """Where client data comes from and how it is split across clients.

    ``data_dir`` (one subfolder per client with ``train.jsonl`` and ``test.jsonl``) takes
    precedence over ``dataset``, a bundled corpus or ``hf:NAME`` (a Hugging Face dataset,
    `fedlora.data.hf`); the partitioner only applies to the latter. Names (``dataset``,
    ``partitioner``) are checked against their registries by `fedlora.plan`.
    """

    dataset: str = setting(
        "bbc-news",
        "bundled corpus: `bbc-news` (BBC News, 5 topics, classification), `shakespeare` (one client per "
        "play and role, `task=causal-lm`) or `shakespeare-chat` (the same roles as chat: a cue and the "
        "role's reply, `task=chat`), see [Presets](#presets); or `hf:NAME`, a Hugging Face dataset (a hub "
        "id, or a local folder or data file), see [Hugging Face datasets](#hugging-face-datasets)",
        identity=True,
    )
    data_dir: str = setting(
        "",
        "folder with one subfolder per client (`train.jsonl`, `test.jsonl`); overrides `dataset`",
        identity=True,
    )
    partitioner: str = setting(
        "dirichlet",
        "`iid`, `dirichlet` (label skew) or `natural` (one client per natural id of the corpus; `hf:` "
        "datasets: per value of `partition-by`)",
        identity=True,
    )
    dirichlet_alpha: float = setting(0.3, "Dirichlet concentration: smaller is more skewed", identity=True)
    test_fraction: float = setting(
        0.5,
        "share of each client's examples held out for its test split (bundled corpus, `hf:` datasets without "
        "`hf-test-split`; `shakespeare`: the role's last lines)",
        identity=True,
    )
    labels: tuple[str, ...] = setting(
        (),
        "comma-separated label set; empty: the corpus's, or every label found under `data-dir`",
        identity=True,
        resolved=True,
    )
    min_lines: int = setting(
        40,
        "`shakespeare`, `shakespeare-chat`: smallest role kept as a client (523 roles at 40 lines, 987 at 8; "
        "`shakespeare-chat` also needs two exchanges: 521 at 40, 355 at 80)",
    )
    hf_subset: str = setting(
        "", "`hf:` datasets: the subset (configuration) to load; empty: the dataset's default", identity=True
    )
    hf_split: str = setting(
        "train", "`hf:` datasets: the split that `partitioner` divides among the clients", identity=True
    )
    hf_test_split: str = setting(
        "",
        "`hf:` datasets: a split divided the same way for the clients' test data (`natural`: the same ids; "
        "`iid`, `dirichlet`: the same kind of partitioner and seed); empty: each client holds out "
        "`test-fraction` of its share of `hf-split`, at random",
        identity=True,
    )
    partition_by: str = setting(
        "",
        "`hf:` datasets: the column `partitioner` reads: `natural`, the id column (a user, a speaker; one "
        "client per value, in sorted order); `dirichlet`, the column whose values each client gets a skewed "
        "share of (empty: `label-column` under classification); `iid` ignores it",
        identity=True,
    )
    text_column: str = setting(
        "text", "`hf:` datasets: the column of texts (`classification`, `causal-lm`)", identity=True
    )
    label_column: str = setting(
        "label",
        "`hf:` datasets: the column of labels (`classification`); the label set is a `ClassLabel`'s names, "
        "else the sorted distinct values",
        identity=True,
    )
    messages_column: str = setting(
        "messages",
        "`hf:` datasets, `task=chat`: the column of conversations (lists of `{role, content}`), read where "
        "the dataset has it; else `prompt-column` and `completion-column`",
        identity=True,
    )
    prompt_column: str = setting(
        "prompt", "`hf:` datasets, `task=chat`: the column of prompts (the user turn)", identity=True
    )
    completion_column: str = setting(
        "completion",
        "`hf:` datasets, `task=chat`: the column of completions (the assistant turn)",
        identity=True,
    )

    @property
    def hf_dataset(self) -> str:
        """NAME of ``dataset=hf:NAME``; empty for another dataset, or under ``data-dir`` (which wins)."""
        if self.data_dir or not self.dataset.startswith(HF_PREFIX):
            return ""
        return self.dataset[len(HF_PREFIX) :]

    def __post_init__(self) -> None:
        if not self.data_dir and not self.dataset.strip():
            raise fail("dataset", "a bundled dataset name", self.dataset)
        if self.dataset.startswith(HF_PREFIX) and not self.dataset[len(HF_PREFIX) :].strip():
            raise fail(
                "dataset", "hf:NAME with a hub id, a local folder or a data file as NAME", self.dataset
            )
        if not self.hf_split.strip():
            raise fail("hf-split", "a split name (e.g. train)", self.hf_split)
        if self.hf_test_split == self.hf_split:
            raise fail(
                "hf-test-split",
                "a split other than hf-split, or empty (hold out test-fraction of hf-split)",
                self.hf_test_split,
            )
        if self.hf_dataset and self.partitioner == "natural" and not self.partition_by:
            raise fail(
                "partition-by",
                "the id column for partitioner=natural over an hf: dataset (one client per value)",
                self.partition_by,
            )
        for name in ("text_column", "label_column", "messages_column", "prompt_column", "completion_column"):
            if not getattr(self, name).strip():
                raise fail(key(name), "a column name", getattr(self, name))
        if self.dirichlet_alpha <= 0:
            raise fail("dirichlet-alpha", "a positive number", self.dirichlet_alpha)
        if not 0.0 < self.test_fraction < 1.0:
            raise fail("test-fraction", "a number in (0, 1)", self.test_fraction)
        if self.min_lines < 2:
            raise fail("min-lines", "an integer >= 2 (a train and a test line)", self.min_lines)
        if len(set(self.labels)) != len(self.labels):
            raise fail("labels", "a comma-separated list without repeats", ",".join(self.labels))


@dataclass(frozen=True)
class TrainConfig:
    """Local training on a client: what one round of local work is."""

    batch_size: int = setting(16, "examples per local step")
    learning_rate: float = setting(
        5e-3, "AdamW learning rate of local training (a fresh optimizer every round)"
    )
    local_steps: int = setting(3, "steps of the shared adapter per round")
    personal_steps: int = setting(
        3, "steps of the personal adapter per round (0: personalized equals global)"
    )
    ditto_lambda: float = setting(0.1, "`ditto`: weight of `||v - w_global||^2 / 2` in the personal loss")
    personal_mix: str = setting(
        "off",
        "`validation`: each client predicts with `(1 - w) * global + w * personalized` (a mixture of the two "
        "models' predicted probabilities), `w` chosen in {0, 0.1, ..., 1} each evaluated round on its "
        "validation split (classification: best accuracy, then loss; causal LMs: loss); a client whose "
        "personal part does not help falls back to the global model (`w = 0`); `off`: the personalized "
        "model alone",
    )
    validation_fraction: float = setting(
        0.2,
        "share of each client's training examples held out of its personal training as its validation "
        "split (seeded by `partition-seed`, never from the test split; the shared adapter trains on all) "
        "when `personal-mix=validation` or the method uses one; none from a client with fewer than 2",
    )
    num_threads: int = setting(1, "torch threads per client process (0: torch's default)", resumable=True)
    micro_batch_size: int = setting(
        0,
        "gradient accumulation: each step's batch is run in micro-batches of at most this many examples "
        "(the same update as the whole batch, less memory); 0: the whole batch at once",
    )
    lr_schedule: str = setting(
        "constant",
        "`constant`, or `cosine`: the learning rate decays to 0 along a cosine over the federation's rounds "
        "(each client's own steps, round after round)",
    )
    lr_warmup_fraction: float = setting(
        0.0, "share of the federation's local steps over which the learning rate rises linearly from 0"
    )

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise fail("batch-size", "a positive integer", self.batch_size)
        if self.batch_size > MAX_BATCH:
            raise fail("batch-size", f"an integer in [1, {MAX_BATCH}]", self.batch_size)
        if not 0 < self.learning_rate < 1:
            raise fail("learning-rate", "a number in (0, 1)", self.learning_rate)
        if not 0 < self.local_steps <= MAX_STEPS:
            raise fail("local-steps", f"an integer in [1, {MAX_STEPS}]", self.local_steps)
        if not 0 <= self.personal_steps <= MAX_STEPS:
            raise fail("personal-steps", f"an integer in [0, {MAX_STEPS}]", self.personal_steps)
        if self.ditto_lambda < 0:
            raise fail("ditto-lambda", "a number >= 0", self.ditto_lambda)
        if self.num_threads < 0:
            raise fail("num-threads", "an integer >= 0 (0 keeps torch's default)", self.num_threads)
        if not 0 <= self.micro_batch_size <= MAX_BATCH:
            raise fail(
                "micro-batch-size",
                f"an integer in [0, {MAX_BATCH}] (0: no accumulation)",
                self.micro_batch_size,
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise fail("lr-schedule", f"one of {', '.join(LR_SCHEDULES)}", self.lr_schedule)
        if not 0.0 <= self.lr_warmup_fraction < 1.0:
            raise fail("lr-warmup-fraction", "a number in [0, 1)", self.lr_warmup_fraction)
        if self.personal_mix not in PERSONAL_MIXES:
            raise fail("personal-mix", f"one of {', '.join(PERSONAL_MIXES)}", self.personal_mix)
        if not 0.0 < self.validation_fraction <= 0.5:
            raise fail("validation-fraction", "a number in (0, 0.5]", self.validation_fraction)


@dataclass(frozen=True)
class FederationConfig:
    """Server-side choices: rounds, sampling, baselines and where results go.

    ``strategy`` and ``personalization`` are names in their registries; `fedlora.plan`
    resolves them and checks that they fit together and with the rest of the config.
    """

    num_server_rounds: int = setting(5, "federated rounds", resumable=True)
    fraction_train: float = setting(1.0, "share of clients sampled for training each round")
    fraction_evaluate: float = setting(
        1.0,
        "share of clients sampled for evaluation (and personalization) each round; the summary's accuracies "
        "are those of the sampled clients",
    )
    min_clients: int = setting(
        2,
        "clients that must be connected before a round starts (`fedlora simulate` sets it to `--clients`)",
        resumable=True,
        placement=True,
    )
    strategy: str = setting("fedavg", "aggregation strategy, see [Strategies](#strategies)", identity=True)
    personalization: str = setting(
        "auto",
        "`none`, `finetune`, `dual`, `ditto`, `fedsa-lora`; `auto`: `fedsa-lora` under that strategy, else "
        "`dual`",
        identity=True,
    )
    proximal_mu: float = setting(0.01, "`fedprox`: weight of the proximal term")
    server_learning_rate: float = setting(
        0.0,
        "`fedadam`/`fedyogi` eta, `fedavgm` server learning rate; 0: the strategy's default (0.01, 0.01, "
        "1.0)",
    )
    server_momentum: float = setting(0.9, "`fedavgm`: server momentum")
    trim_fraction: float = setting(0.2, "`trimmed-mean`: share of values cut from each end, per coordinate")
    byzantine_clients: int = setting(0, "`krum`: number of malicious clients f it tolerates")
    max_examples_per_client: int = setting(
        100_000,
        "the server drops an update whose reply claims a weight (`num-examples`) that is not a whole "
        "number from 1 to this (a huge claim would make the mean that client's upload)",
    )
    max_update_norm: float = setting(
        math.inf,
        "the server drops an upload whose L2 distance from the global arrays it started from exceeds this "
        "(uploads with NaN/Inf, missing, extra or misshapen tensors are always dropped)",
        unbounded=True,
    )
    max_update_norm_ratio: float = setting(
        10.0,
        "the server drops an upload whose update norm exceeds this multiple of the round's lower-median "
        "update norm (a huge upload is refused out of the box; inf: no bound)",
        unbounded=True,
    )
    max_client_weight_share: float = setting(
        0.2,
        "no client weighs more than this share of a round's total weight in the mean (at least 1/n of "
        "n clients; 1: no cap); applied after max-examples-per-client",
    )
    local_only_baseline: bool = setting(
        True,
        "after the rounds, every client also trains an adapter alone (the local-only column)",
        resumable=True,
    )
    seed: int = setting(
        0,
        "training seed: the adapters' and heads' initialisation, each client's batches and dropout, the "
        "server's client sampling and the evaluation samples; also the data partition unless "
        "`partition-seed` is set",
        identity=True,
    )
    partition_seed: int = setting(
        -1,
        "seed of the data partition (which examples each client holds, its held-out and validation "
        "splits); -1: `seed`. Fix it to vary training noise over one split of the data",
        identity=True,
    )
    out_dir: str = setting(
        "",
        "run directory: a folder inside the server's runs folder (`FEDLORA_RUNS_ROOT` where the ServerApp "
        "runs, else its working directory), by relative or absolute path; empty: `runs/<timestamp>` under "
        "the working directory (`<timestamp>` under `FEDLORA_RUNS_ROOT`)",
        resumable=True,
        placement=True,
    )
    evaluate_every: int = setting(
        1,
        "clients measure the global and personalized adapters on their held-out split every this many "
        "rounds, and always in the last one; in the other rounds they train (personal steps too) and "
        "report no accuracy",
        resumable=True,
    )
    eval_examples: int = setting(
        32,
        "rounds before the last measure a seeded sample of at most this many held-out examples per client "
        "(the same sample every round); the last round measures every held-out example; 0: every round "
        "measures them all",
        resumable=True,
    )
    responses_per_client: int = setting(
        3,
        "`task=chat` under `fedlora simulate`: after the run, the global and the personalized model answer "
        "this many of each client's held-out prompts (the first 16 clients), side by side in "
        "`responses.jsonl`; 0: none",
        resumable=True,
    )
    round_timeout: float = setting(
        3600.0,
        "seconds the server waits for a round's replies; a client that has not answered by then is counted "
        "as failed and the round goes on without it",
        resumable=True,
    )
    min_reply_fraction: float = setting(
        0.5,
        "a round changes the global adapter only if at least this share of the sampled clients returned a "
        "valid update; otherwise the global adapter is kept and the run goes on",
        resumable=True,
    )
    resume: bool = setting(
        False,
        "continue the run in `out-dir` from its last checkpoint (global arrays, strategy state, round "
        "number, results so far) instead of starting afresh",
        resumable=True,
        placement=True,
    )
    client_state_dir: str = setting(
        "",
        "where each client keeps its personal adapter, kept LoRA parts and privacy ledger on disk (a "
        "deployed node's `state-dir` node config wins); empty: `<out-dir>/clients` under `fedlora "
        "simulate`, the node's memory otherwise",
        placement=True,
    )

    def evaluates(self, server_round: int) -> bool:
        """Whether clients measure held-out accuracy in ``server_round`` (1-based)."""
        return server_round % self.evaluate_every == 0 or server_round >= self.num_server_rounds

    def samples_held_out(self, server_round: int) -> bool:
        """Whether ``server_round`` measures a sample of the held-out split (``eval-examples``)."""
        return self.eval_examples > 0 and server_round < self.num_server_rounds

    def __post_init__(self) -> None:
        if not 0 < self.num_server_rounds <= MAX_ROUNDS:
            raise fail("num-server-rounds", f"an integer in [1, {MAX_ROUNDS}]", self.num_server_rounds)
        if not 0.0 < self.fraction_train <= 1.0:
            raise fail("fraction-train", "a number in (0, 1]", self.fraction_train)
        if not 0.0 < self.fraction_evaluate <= 1.0:
            raise fail("fraction-evaluate", "a number in (0, 1]", self.fraction_evaluate)
        if self.min_clients <= 0:
            raise fail("min-clients", "a positive integer", self.min_clients)
        if not self.strategy.strip():
            raise fail("strategy", "a strategy name", self.strategy)
        if not self.personalization.strip():
            raise fail("personalization", "auto or a personalization name", self.personalization)
        if self.proximal_mu < 0:
            raise fail("proximal-mu", "a number >= 0", self.proximal_mu)
        if self.server_learning_rate < 0:
            raise fail(
                "server-learning-rate", "a number >= 0 (0: the strategy's default)", self.server_learning_rate
            )
        if not 0.0 <= self.server_momentum < 1.0:
            raise fail("server-momentum", "a number in [0, 1)", self.server_momentum)
        if not 0.0 <= self.trim_fraction < 0.5:
            raise fail("trim-fraction", "a number in [0, 0.5)", self.trim_fraction)
        if self.byzantine_clients < 0:
            raise fail("byzantine-clients", "an integer >= 0", self.byzantine_clients)
        if self.max_examples_per_client < 1:
            raise fail("max-examples-per-client", "a positive integer", self.max_examples_per_client)
        if not self.max_update_norm > 0:
            raise fail("max-update-norm", "a positive number (inf: no bound)", self.max_update_norm)
        if not self.max_update_norm_ratio >= 1:
            raise fail("max-update-norm-ratio", "a number >= 1 (inf: no bound)", self.max_update_norm_ratio)
        if not 0.0 < self.max_client_weight_share <= 1.0:
            raise fail("max-client-weight-share", "a number in (0, 1]", self.max_client_weight_share)
        if self.eval_examples < 0:
            raise fail("eval-examples", "an integer >= 0 (0: every held-out example)", self.eval_examples)
        if not 0 <= self.responses_per_client <= 1000:
            raise fail("responses-per-client", "an integer in [0, 1000] (0: none)", self.responses_per_client)
        if not 1 <= self.evaluate_every <= MAX_ROUNDS:
            raise fail("evaluate-every", f"an integer in [1, {MAX_ROUNDS}]", self.evaluate_every)
        if not self.round_timeout > 0:
            raise fail("round-timeout", "a positive number of seconds", self.round_timeout)
        if not 0.0 <= self.min_reply_fraction <= 1.0:
            raise fail("min-reply-fraction", "a number in [0, 1]", self.min_reply_fraction)
        if self.partition_seed < -1:
            raise fail("partition-seed", "an integer >= 0, or -1 for `seed`", self.partition_seed)

    @property
    def data_seed(self) -> int:
        """The seed of the data partition: ``partition-seed``, else ``seed``."""
        return self.seed if self.partition_seed < 0 else self.partition_seed


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level DP-SGD on every client (off while both noise and target epsilon are 0).

    ``dp-target-epsilon`` > 0 picks each client's noise multiplier so that its whole run
    (rounds x (local + personal steps), at its own sample rate) spends that epsilon;
    otherwise ``dp-noise-multiplier`` is used as given. A client whose next round would
    take it past ``dp-epsilon-budget`` declines to train.
    """

    dp_noise_multiplier: float = setting(
        0.0,
        "DP-SGD noise multiplier on every client's adapter training; 0 with `dp-target-epsilon` 0: DP off",
    )
    dp_target_epsilon: float = setting(
        0.0, "if > 0, each client's noise multiplier is calibrated so that its whole run spends this epsilon"
    )
    dp_max_grad_norm: float = setting(1.0, "DP-SGD per-example gradient clipping norm")
    dp_delta: float = setting(1e-5, "delta of the reported epsilon")
    dp_accountant: str = setting("rdp", "`rdp` or `prv` (Opacus accountants)")
    dp_epsilon_budget: float = setting(
        math.inf,
        "a client whose next round would take its epsilon past this declines to train",
        unbounded=True,
    )
    dp_secure_mode: bool = setting(
        False,
        "DP-SGD noise from a cryptographically secure generator (Opacus `secure_mode`; needs `torchcsprng`, "
        "not on PyPI)",
    )
    dp_personal: bool = setting(
        True,
        "DP-SGD also on the personal adapter; `false`: only what leaves the client (the shared adapter) is "
        "DP-trained and spends epsilon, the personal adapter trains without noise",
    )
    client_dp: str = setting(
        "off",
        "client-level DP: `off`, `server-clipping` or `client-clipping` (where each whole update is clipped)",
    )
    client_dp_noise_multiplier: float = setting(
        1.0,
        "client-level DP: noise standard deviation on the mean update, in units of clipping norm / clients "
        "sampled",
    )
    client_dp_clipping_norm: float = setting(
        1.0,
        "client-level DP: L2 bound on each client's update (upload minus the global arrays it started from)",
    )
    client_dp_epsilon_budget: float = setting(
        math.inf,
        "client-level DP: the server stops training before a round that would take epsilon past this",
        unbounded=True,
    )
    secure_aggregation: bool = setting(
        False, "Flower SecAgg+: the server only ever sees the sum of the clients' masked uploads"
    )
    secagg_clipping_range: float = setting(
        8.0, "SecAgg+: uploaded values are clipped to +-this before quantization"
    )
    secagg_max_weight: float = setting(
        1000.0,
        "SecAgg+: largest client weight (training examples); uploads are scaled by weight / this before "
        "quantization, so a tighter bound is more precise",
    )
    canary_repeats: int = setting(
        0,
        "causal LMs: insert a random secret this many times into one client's training text and report its "
        "exposure (bits) at the end; 0: off",
    )
    canary_client: int = setting(0, "the partition id of the client that holds the canary")
    audit_examples: int = setting(
        0,
        "opt-in: the final round's membership-inference audit compares the losses of at most this many "
        "training and this many held-out examples per client (a seeded sample; the count is reported); "
        "0: no audit",
    )
    audit_wire_log: str = setting(
        "",
        "a file where every client appends the shape (keys, dtypes, sizes; no values) of each reply, for "
        "`fedlora audit --wire`",
        resumable=True,
    )

    def __post_init__(self) -> None:
        if self.dp_noise_multiplier < 0:
            raise fail(
                "dp-noise-multiplier",
                "a number >= 0 (0: DP off unless dp-target-epsilon)",
                self.dp_noise_multiplier,
            )
        if self.dp_target_epsilon < 0:
            raise fail(
                "dp-target-epsilon", "a number >= 0 (0: use dp-noise-multiplier)", self.dp_target_epsilon
            )
        if self.dp_max_grad_norm <= 0:
            raise fail("dp-max-grad-norm", "a positive number", self.dp_max_grad_norm)
        if not 0.0 < self.dp_delta < 1.0:
            raise fail("dp-delta", "a number in (0, 1)", self.dp_delta)
        if self.dp_accountant not in DP_ACCOUNTANTS:
            raise fail("dp-accountant", f"one of {', '.join(DP_ACCOUNTANTS)}", self.dp_accountant)
        if not self.dp_epsilon_budget > 0:
            raise fail("dp-epsilon-budget", "a positive number (inf: no budget)", self.dp_epsilon_budget)
        if self.dp_secure_mode and self.enabled:
            _require_module(
                "torchcsprng",
                "dp-secure-mode",
                "torchcsprng, Opacus' cryptographically secure noise source (not on PyPI: build it "
                "from github.com/pytorch/csprng), or set dp-secure-mode=false",
            )
        if self.client_dp not in CLIENT_DP_MODES:
            raise fail("client-dp", f"one of {', '.join(CLIENT_DP_MODES)}", self.client_dp)
        if not self.client_dp_noise_multiplier > 0:
            raise fail("client-dp-noise-multiplier", "a positive number", self.client_dp_noise_multiplier)
        if not self.client_dp_clipping_norm > 0:
            raise fail("client-dp-clipping-norm", "a positive number", self.client_dp_clipping_norm)
        if not self.client_dp_epsilon_budget > 0:
            raise fail(
                "client-dp-epsilon-budget",
                "a positive number (inf: no budget)",
                self.client_dp_epsilon_budget,
            )
        if self.client_dp != "off":
            _require_module("dp_accounting", "client-dp", 'flwr[dp] (pip install "flwr[dp]")')
        if not self.secagg_clipping_range > 0:
            raise fail("secagg-clipping-range", "a positive number", self.secagg_clipping_range)
        if self.canary_repeats < 0:
            raise fail("canary-repeats", "an integer >= 0 (0: no canary)", self.canary_repeats)
        if not 0 <= self.audit_examples <= 1_000_000:
            raise fail("audit-examples", "an integer in [0, 1000000] (0: no audit)", self.audit_examples)
        if self.canary_client < 0:
            raise fail("canary-client", "a partition id >= 0", self.canary_client)
        if not self.secagg_max_weight > 0:
            raise fail("secagg-max-weight", "a positive number", self.secagg_max_weight)

    @property
    def client_level(self) -> bool:
        """Whether the server clips whole client updates and adds noise to their mean."""
        return self.client_dp != "off"

    @property
    def enabled(self) -> bool:
        """Whether clients train with DP-SGD."""
        return self.dp_noise_multiplier > 0 or self.dp_target_epsilon > 0
