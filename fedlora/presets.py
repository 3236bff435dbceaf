"""Named federations: a workload's data, model and training settings under one name.

``fedlora simulate --preset NAME`` starts from the preset's run config and client count;
``--clients``, ``--rounds`` and ``--run-config`` still override any of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fedlora.config import Scalar
from fedlora.core.errors import ConfigError

__all__ = ["PRESETS", "Preset", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """A workload: its run config (kebab-case keys) and how many clients it simulates."""

    name: str
    summary: str
    clients: int
    config: Mapping[str, Scalar] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "bbc-news",
            "the default benchmark: MiniLM classifies BBC News topics, 20 clients with skewed topics",
            20,
        ),
        Preset(
            "shakespeare",
            "LEAF-style Shakespeare: one client per (play, role), SmolLM2-135M learns each role's "
            "next words; the role's later lines are its test split",
            10,
            {
                "dataset": "shakespeare",
                "task": "causal-lm",
                "model": "smollm2",
                "max-length": 48,
                "test-fraction": 0.2,
                "batch-size": 8,
                "learning-rate": 0.002,
                "local-steps": 4,
                "personal-steps": 4,
                "num-server-rounds": 3,
            },
        ),
        Preset(
            "shakespeare-chat",
            "Shakespeare as personal chat: one client per (play, role), each example a cue (another "
            "character's line just before) and the role's reply; SmolLM2-135M-Instruct with its chat "
            "template, the loss on the replies only; the role's later exchanges are its test split; "
            "each round's personalized model is the new global one fine-tuned on the role's exchanges",
            10,
            {
                "dataset": "shakespeare-chat",
                "task": "chat",
                "model": "smollm2",
                # Roles of at least 80 lines: 18 to 40 training exchanges each (355 roles).
                "min-lines": 80,
                "personalization": "finetune",
                "max-length": 64,
                "test-fraction": 0.2,
                "batch-size": 8,
                "learning-rate": 0.002,
                "local-steps": 4,
                "personal-steps": 4,
                "num-server-rounds": 3,
            },
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises
    ------
    ConfigError
        If there is none, listing those there are.

    """
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"preset: must be one of {', '.join(PRESETS)}, got {name!r}") from None
