"""Device profiles: caps on a node's local work so that small devices can take part.

A deployed node names its profile in its node config (``fedlora client --profile pi``).
The profile caps the batch size and the sequence length, sets the torch threads, may
load the frozen base in bfloat16 (half its memory, the same held-out quality on the
bundled models; the LoRA adapters stay float32), and caps the LoRA rank where the
strategy takes mixed ranks (flora, flexlora, fedex-lora); under the other strategies
every client must share the run's rank, which is kept.

A profile clamps what a run asks; a device's own policy (`fedlora.client.policy`: steps,
threads, tokens, evaluated examples, privacy) refuses a run that asks for more, judging the
settings as the profile left them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError

__all__ = ["PROFILES", "DeviceProfile", "apply_profile"]


@dataclass(frozen=True)
class DeviceProfile:
    """Upper bounds on one node's training work."""

    name: str
    summary: str
    max_rank: int
    max_batch_size: int
    max_length: int
    num_threads: int
    base_dtype: str = ""  # empty: the run's


PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(
            "phone",
            "phone via Termux: rank <= 4, batch <= 4, 64 tokens, 1 thread, a bfloat16 base",
            4,
            4,
            64,
            1,
            "bfloat16",
        ),
        DeviceProfile("pi", "Raspberry Pi 4/5: rank <= 8, batch <= 8, 128 tokens, 4 threads", 8, 8, 128, 4),
        DeviceProfile("laptop", "laptop: the run's own settings, 2 threads", 64, 64, 512, 2),
    )
}


def apply_profile(cfg: RunConfig, rank: int, name: str, *, heterogeneous: bool) -> tuple[RunConfig, int]:
    """The run config and LoRA rank for a node with profile ``name`` (empty: no profile).

    Raises
    ------
    ConfigError
        If there is no profile of that name.

    """
    if not name:
        return cfg, rank
    try:
        profile = PROFILES[name]
    except KeyError:
        raise ConfigError(f"profile: must be one of {', '.join(PROFILES)}, got {name!r}") from None
    train = dataclasses.replace(
        cfg.train,
        batch_size=min(cfg.train.batch_size, profile.max_batch_size),
        num_threads=profile.num_threads,
    )
    model = dataclasses.replace(
        cfg.model,
        max_length=min(cfg.model.max_length, profile.max_length),
        # A quantized base keeps its own compute dtype.
        base_dtype=profile.base_dtype
        if profile.base_dtype and cfg.model.quantization == "none"
        else cfg.model.base_dtype,
    )
    return (
        dataclasses.replace(cfg, train=train, model=model),
        min(rank, profile.max_rank) if heterogeneous else rank,
    )
