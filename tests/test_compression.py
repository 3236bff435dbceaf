"""Value codecs for adapter updates, against hand-computed payloads and independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora.lora.compression import CODECS, Codec, CodecError, ErrorFeedback, decode, encode, payload_bytes


def _random(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 0.02, size).astype(np.float32)


def test_int8_payload_of_a_hand_computed_block():
    # absmax 127/64: scale 1/64, so every code is exact.
    values = np.array([127 / 64, -1.0, 0.5, 0.0], dtype=np.float32)
    payload = encode(values, Codec("int8", block_size=4))
    assert payload["codes"].tolist() == [127, -64, 32, 0] and payload["codes"].dtype == np.int8
    assert payload["scales"].tolist() == [1 / 64]
    assert decode(payload, (4,), Codec("int8", block_size=4)).tolist() == values.tolist()


def test_int4_packs_two_codes_a_byte_low_half_first():
    # absmax 1.75: scale 0.25; codes 7, -3, 1 stored as 15, 5, 9 and a zero code (8) as padding.
    values = np.array([1.75, -0.75, 0.25], dtype=np.float32)
    codec = Codec("int4", block_size=4)
    payload = encode(values, codec)
    assert payload["codes"].tolist() == [15 | 5 << 4, 9 | 8 << 4] and payload["codes"].dtype == np.uint8
    assert payload["scales"].tolist() == [0.25]
    assert decode(payload, (3,), codec).tolist() == values.tolist()


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("block_size", [1, 7, 64])
def test_an_integer_codec_errs_by_at_most_half_a_step_of_its_blocks_scale(name, block_size):
    values = _random(1000)  # not a multiple of 7 or 64: the last block is short
    codec = Codec(name, block_size=block_size)
    payload = encode(values, codec)
    decoded = decode(payload, values.shape, codec)
    step = np.repeat(payload["scales"], block_size)[: values.size]
    assert np.all(np.abs(decoded - values) <= step / 2 * (1 + 1e-6) + 1e-12)


def test_fp16_and_bf16_round_trips_are_within_their_precision_and_bf16_is_torchs():
    values = _random(4096, seed=1)
    half = decode(encode(values, Codec("fp16")), values.shape, Codec("fp16"))
    assert np.all(np.abs(half - values) <= np.abs(values) * 2.0**-11 + 2.0**-25)  # subnormals near 0
    brain = decode(encode(values, Codec("bf16")), values.shape, Codec("bf16"))
    assert np.all(np.abs(brain - values) <= np.abs(values) * 2.0**-8)
    # Round to nearest even, as torch converts: the same bits.
    assert np.array_equal(brain, torch.from_numpy(values).to(torch.bfloat16).float().numpy())


def test_stochastic_rounding_is_unbiased_and_rounding_to_nearest_is_not():
    # Each value sits 0.3 of a step above a code: to nearest always rounds it down.
    scale = 1 / 64
    values = np.array([127 * scale, *(np.arange(-40, 40) + 0.3) * scale], dtype=np.float32)
    codec, nearest = (
        Codec("int8", block_size=values.size, stochastic_rounding=True),
        Codec("int8", block_size=81),
    )
    rng = np.random.default_rng(0)
    draws = 4000
    mean = np.mean([decode(encode(values, codec, rng), values.shape, codec) for _ in range(draws)], axis=0)
    # One draw is off by at most one step (standard deviation <= step/2): 5 of the mean's sigmas.
    assert np.all(np.abs(mean - values) <= 5 * scale / (2 * np.sqrt(draws)))
    biased = decode(encode(values, nearest), values.shape, nearest) - values
    assert np.allclose(biased[1:], -0.3 * scale, atol=1e-7)


def test_topk_keeps_exactly_the_k_largest_magnitudes():
    values = _random(1000, seed=2)
    codec = Codec("topk", topk_fraction=0.05)
    payload = encode(values, codec)
    decoded = decode(payload, values.shape, codec)
    largest = set(np.argsort(np.abs(values))[-50:].tolist())  # ceil(0.05 * 1000)
    assert set(np.flatnonzero(decoded).tolist()) == largest
    assert np.array_equal(decoded[list(largest)], values[list(largest)])
    assert payload_bytes(payload) == 50 * 4 + 50 * 4  # uint32 index and float32 value each
    # topk+int8: the same entries, their values quantized.
    mixed = Codec("topk+int8", topk_fraction=0.05, block_size=64)
    assert set(np.flatnonzero(decode(encode(values, mixed), values.shape, mixed)).tolist()) == largest


def test_error_feedback_sends_everything_over_the_rounds():
    # Dyadic updates and a top-k codec: every sum is exact in float32, so equality is exact.
    rng = np.random.default_rng(3)
    codec = Codec("topk", topk_fraction=0.25)
    feedback = ErrorFeedback()
    sent = np.zeros(64, dtype=np.float32)
    true = np.zeros(64, dtype=np.float32)
    for _ in range(6):
        update = (rng.integers(-64, 64, 64) / 1024).astype(np.float32)
        sent += decode(feedback.encode("lora_A", update, codec), (64,), codec)
        true += update
    assert np.array_equal(sent, true - feedback.residual["lora_A"])
    # A lossy quantizer: the same identity, within float32 rounding.
    codec, feedback = Codec("int4", block_size=16), ErrorFeedback()
    sent, true = np.zeros(64, dtype=np.float64), np.zeros(64, dtype=np.float64)
    for r in range(6):
        update = _random(64, seed=10 + r)
        sent += decode(feedback.encode("lora_B", update, codec), (64,), codec)
        true += update
    assert np.allclose(sent, true - feedback.residual["lora_B"], atol=1e-7)


def test_compressed_bytes_per_codec():
    values = _random(4096)
    sizes = {name: payload_bytes(encode(values, Codec(name, topk_fraction=0.1))) for name in CODECS}
    assert sizes["fp32"] == 16384 and sizes["fp16"] == sizes["bf16"] == 8192
    assert sizes["int8"] == 4096 + 64 * 4 and sizes["int4"] == 2048 + 64 * 4
    assert sizes["topk"] == 410 * 8 and sizes["topk+int4"] == 410 * 4 + 205 + 7 * 4


@pytest.mark.parametrize(
    ("codec", "payload", "reason"),
    [
        (
            Codec("int8", block_size=4),
            {"codes": np.zeros(3, np.int8), "scales": np.ones(1, np.float32)},
            "4 values",
        ),
        (
            Codec("int8", block_size=4),
            {"codes": np.zeros(4, np.int16), "scales": np.ones(1, np.float32)},
            "int8",
        ),
        (
            Codec("int8", block_size=4),
            {"codes": np.zeros(4, np.int8), "scales": np.array([np.nan], np.float32)},
            "finite",
        ),
        (
            Codec("int8", block_size=4),
            {"codes": np.zeros(4, np.int8), "scales": np.array([-1.0], np.float32)},
            ">= 0",
        ),
        (
            Codec("int8", block_size=4),
            {"codes": np.full(4, -128, np.int8), "scales": np.ones(1, np.float32)},
            "[-127",
        ),
        (
            Codec("int4", block_size=4),
            {"codes": np.zeros(2, np.uint8), "scales": np.ones(1, np.float32)},
            "[-7",
        ),
        (Codec("int8", block_size=4), {"codes": np.zeros(4, np.int8)}, "expected"),
        (Codec("fp16"), {"values": np.array([np.inf] * 4, np.float16)}, "finite"),
        (
            Codec("topk", topk_fraction=0.5),
            {"index": np.array([1, 4], np.uint32), "values": np.ones(2, np.float32)},
            "below 4",
        ),
        (
            Codec("topk", topk_fraction=0.5),
            {"index": np.array([1, 1], np.uint32), "values": np.ones(2, np.float32)},
            "increasing",
        ),
    ],
)
def test_a_malformed_payload_is_refused_with_its_reason(codec, payload, reason):
    with pytest.raises(CodecError) as err:
        decode(payload, (4,), codec)
    assert reason in str(err.value)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"name": "zip"}, "codec: one of fp32"),
        ({"name": "int8", "block_size": 0}, "codec-block-size"),
        ({"name": "int8", "block_size": -3}, "codec-block-size"),
        ({"name": "topk", "topk_fraction": 0.0}, "codec-topk-fraction"),
        ({"name": "topk", "topk_fraction": 1.5}, "codec-topk-fraction"),
    ],
)
def test_bad_codec_settings_are_refused_naming_the_key(settings, key):
    with pytest.raises(CodecError) as err:
        Codec(**settings)
    assert str(err.value).startswith(key)
