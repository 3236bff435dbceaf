"""Base models: bundled offline models, hub ids or local folders, wrapped with two LoRA adapters."""

from fedlora.models.loading import (
    BUNDLED_MODELS,
    GLOBAL,
    PERSONAL,
    TEST_MODELS,
    LoadedModel,
    build_model,
    cached_model,
    check_model,
    load_base,
    lora_config,
    model_source,
    target_modules,
)

__all__ = [
    "BUNDLED_MODELS",
    "GLOBAL",
    "PERSONAL",
    "TEST_MODELS",
    "LoadedModel",
    "build_model",
    "cached_model",
    "check_model",
    "load_base",
    "lora_config",
    "model_source",
    "target_modules",
]
