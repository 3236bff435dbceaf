"""Device profiles cap a node's work and, on a phone, load the base in bfloat16."""

import pytest

from fedlora.client.profiles import PROFILES, apply_profile
from fedlora.config import RunConfig
from fedlora.core.errors import ConfigError

RUN = RunConfig.from_flat({"batch-size": 16, "max-length": 128, "lora-rank": 8})


def test_no_profile_keeps_the_run_s_settings():
    assert apply_profile(RUN, 8, "", heterogeneous=True) == (RUN, 8)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_a_profile_caps_batch_length_threads_and_mixed_ranks(name):
    profile = PROFILES[name]
    cfg, rank = apply_profile(RUN, 8, name, heterogeneous=True)
    assert cfg.train.batch_size == min(16, profile.max_batch_size)
    assert cfg.model.max_length == min(128, profile.max_length)
    assert cfg.train.num_threads == profile.num_threads
    assert rank == min(8, profile.max_rank)
    # Under a strategy that needs one rank everywhere, the run's rank is kept.
    assert apply_profile(RUN, 8, name, heterogeneous=False)[1] == 8


def test_the_phone_profile_loads_a_bfloat16_base_unless_the_base_is_quantized():
    assert apply_profile(RUN, 8, "phone", heterogeneous=False)[0].model.base_dtype == "bfloat16"
    assert apply_profile(RUN, 8, "pi", heterogeneous=False)[0].model.base_dtype == "float32"
    quantized = RUN.replace(quantization="4bit")
    assert apply_profile(quantized, 8, "phone", heterogeneous=False)[0].model.base_dtype == "float32"


def test_an_unknown_profile_is_refused_naming_those_there_are():
    with pytest.raises(ConfigError, match=r"^profile: must be one of phone, pi, laptop, got 'watch'"):
        apply_profile(RUN, 8, "watch", heterogeneous=True)
