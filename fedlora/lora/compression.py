"""Value codecs for adapter updates: what a tensor costs on the wire, and what it loses.

A codec turns one float32 tensor into a *payload*, a few named NumPy arrays that Flower can
carry, and back. ``fp32`` sends the values as they are; ``fp16`` and ``bf16`` round them to
16 bits; ``int8`` and ``int4`` quantize blocks of ``block_size`` values against one float32
scale each (the block's largest magnitude: absmax), 4-bit codes packed two to a byte;
``topk`` keeps the ``topk_fraction`` largest-magnitude entries with their indices, and
``topk+VALUE`` encodes those entries with a value codec. With ``stochastic_rounding`` the
integer codecs round up or down at random, so that the expected decoded value is the true
one (an unbiased codec); otherwise they round to nearest, within half a step of the scale.

`decode` trusts nothing about a payload: a wrong size, an index out of range or repeated, a
negative or non-finite scale, an unknown name raise `CodecError` with the reason, for the
server to drop that upload by node and reason.

`ErrorFeedback` keeps what a lossy codec did not send and adds it to the next update
(Seide et al. 2014; Karimireddy et al. 2019), so that over rounds everything is sent.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from fedlora.core.errors import FedloraError

__all__ = [
    "CODECS",
    "Codec",
    "CodecError",
    "ErrorFeedback",
    "decode",
    "encode",
    "payload_bytes",
]

_VALUES = ("fp32", "fp16", "bf16", "int8", "int4")
CODECS = (*_VALUES, "topk", *(f"topk+{v}" for v in _VALUES if v != "fp32"))
# The largest code of each integer codec: codes are symmetric around 0 (-127..127, -7..7).
_LEVELS = {"int8": 127, "int4": 7}

Payload = dict[str, np.ndarray]


class CodecError(FedloraError):
    """A payload that does not decode: what is wrong with it."""


@dataclasses.dataclass(frozen=True)
class Codec:
    """One codec and its settings.

    Parameters
    ----------
    name : str
        One of `CODECS`.
    block_size : int
        Values per quantization block (``int8``, ``int4``): one float32 scale each.
    topk_fraction : float
        The share of a tensor's entries ``topk`` keeps, in (0, 1].
    stochastic_rounding : bool
        Integer codecs round at random, unbiased, instead of to nearest.

    """

    name: str = "fp32"
    block_size: int = 64
    topk_fraction: float = 0.1
    stochastic_rounding: bool = False

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise CodecError(f"codec: one of {', '.join(CODECS)}, got {self.name!r}")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size < 1:
            raise CodecError(f"codec-block-size: an integer >= 1, got {self.block_size!r}")
        if not 0.0 < self.topk_fraction <= 1.0:
            raise CodecError(f"codec-topk-fraction: a number in (0, 1], got {self.topk_fraction!r}")

    @property
    def value_codec(self) -> str:
        """The codec of the values it sends: for ``topk+int8``, ``int8``; for ``topk``, ``fp32``."""
        if self.name.startswith("topk"):
            return self.name.partition("+")[2] or "fp32"
        return self.name

    @property
    def lossy(self) -> bool:
        """Whether decoding may differ from what was encoded (every codec but ``fp32``)."""
        return self.name != "fp32"

    def kept(self, size: int) -> int:
        """How many of a tensor's ``size`` entries it sends."""
        if not self.name.startswith("topk") or size == 0:
            return size
        return min(size, max(1, math.ceil(self.topk_fraction * size)))


def encode(values: np.ndarray, codec: Codec, rng: np.random.Generator | None = None) -> Payload:
    """The payload of ``values`` (any shape; encoded flat, as float32) under ``codec``.

    ``rng`` draws stochastic rounding (required then; otherwise unused).
    """
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if codec.stochastic_rounding and codec.value_codec in _LEVELS and rng is None:
        raise ValueError("stochastic rounding needs an rng")
    if not codec.name.startswith("topk"):
        return _encode_values(flat, codec, rng)
    k = codec.kept(flat.size)
    # The k largest magnitudes; ties broken by position, so the choice is deterministic.
    order = np.argsort(-np.abs(flat), kind="stable")[:k]
    index = np.sort(order).astype(np.uint32)
    return {"index": index, **_encode_values(flat[index], codec, rng)}


def decode(payload: Mapping[str, np.ndarray], shape: tuple[int, ...], codec: Codec) -> np.ndarray:
    """The float32 tensor of ``shape`` that ``payload`` encodes under ``codec``.

    Raises
    ------
    CodecError
        If the payload is not one that `encode` makes for this shape and codec.

    """
    size = math.prod(shape)
    if not codec.name.startswith("topk"):
        _expect_keys(payload, _value_keys(codec.value_codec))
        return _decode_values(payload, size, codec).reshape(shape)
    k = codec.kept(size)
    _expect_keys(payload, {"index", *_value_keys(codec.value_codec)})
    index = _array(payload, "index", np.uint32, k)
    if k and (int(index.max()) >= size or np.any(np.diff(index.astype(np.int64)) <= 0)):
        raise CodecError(f"codec {codec.name}: indices must be increasing and below {size}")
    out = np.zeros(size, dtype=np.float32)
    out[index] = _decode_values(payload, k, codec)
    return out.reshape(shape)


def payload_bytes(payload: Mapping[str, np.ndarray]) -> int:
    """The bytes of a payload's arrays (Flower adds a few bytes of framing for each)."""
    return sum(int(a.nbytes) for a in payload.values())


class ErrorFeedback:
    """A client's residual: what its codec has not sent yet, added to its next update.

    Over R rounds, the decoded updates sent sum to the true updates' sum minus the current
    residual. The residual is the client's own state: it never leaves the device.
    """

    def __init__(self, residual: Mapping[str, np.ndarray] | None = None) -> None:
        self.residual: dict[str, np.ndarray] = {
            k: np.asarray(v, dtype=np.float32).copy() for k, v in (residual or {}).items()
        }

    def encode(
        self, name: str, update: np.ndarray, codec: Codec, rng: np.random.Generator | None = None
    ) -> Payload:
        """Encode ``update`` plus the residual of tensor ``name``; keep what was not sent."""
        update = np.asarray(update, dtype=np.float32)
        carried = update + self.residual.get(name, np.zeros_like(update))
        payload = encode(carried, codec, rng)
        self.residual[name] = carried - decode(payload, carried.shape, codec)
        return payload


# ---------------------------------------------------------------------------
# Value codecs
# ---------------------------------------------------------------------------


def _value_keys(value_codec: str) -> set[str]:
    return {"codes", "scales"} if value_codec in _LEVELS else {"values"}


def _encode_values(flat: np.ndarray, codec: Codec, rng: np.random.Generator | None) -> Payload:
    name = codec.value_codec
    if name == "fp32":
        return {"values": flat.copy()}
    if name == "fp16":
        return {"values": flat.astype(np.float16)}
    if name == "bf16":
        return {"values": _to_bfloat16_bits(flat)}
    levels = _LEVELS[name]
    blocks = _blocks(flat, codec.block_size)
    absmax = np.abs(blocks).max(axis=1)
    scales = (absmax / levels).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    scaled = blocks / safe[:, None]
    if codec.stochastic_rounding:
        assert rng is not None
        codes = np.floor(scaled + rng.random(scaled.shape, dtype=np.float32))
    else:
        codes = np.rint(scaled)
    codes = np.clip(codes, -levels, levels).astype(np.int8).reshape(-1)[: flat.size]
    if name == "int4":
        return {"codes": _pack_nibbles(codes), "scales": scales}
    return {"codes": codes, "scales": scales}


def _decode_values(payload: Mapping[str, np.ndarray], size: int, codec: Codec) -> np.ndarray:
    name = codec.value_codec
    if name == "fp32":
        values = _array(payload, "values", np.float32, size)
    elif name == "fp16":
        values = _array(payload, "values", np.float16, size).astype(np.float32)
    elif name == "bf16":
        values = _from_bfloat16_bits(_array(payload, "values", np.uint16, size))
    else:
        n_blocks = -(-size // codec.block_size)
        scales = _array(payload, "scales", np.float32, n_blocks)
        if not np.all(np.isfinite(scales)) or np.any(scales < 0):
            raise CodecError(f"codec {codec.name}: block scales must be finite and >= 0")
        if name == "int4":
            codes = _unpack_nibbles(_array(payload, "codes", np.uint8, -(-size // 2)), size)
        else:
            codes = _array(payload, "codes", np.int8, size)
        if np.any(np.abs(codes.astype(np.int16)) > _LEVELS[name]):
            raise CodecError(f"codec {codec.name}: codes must lie in [-{_LEVELS[name]}, {_LEVELS[name]}]")
        padded = np.zeros(n_blocks * codec.block_size, dtype=np.float32)
        padded[:size] = codes
        values = (padded.reshape(n_blocks, codec.block_size) * scales[:, None]).reshape(-1)[:size]
    if not np.all(np.isfinite(values)):
        raise CodecError(f"codec {codec.name}: values must be finite")
    return values.astype(np.float32, copy=False)


def _blocks(flat: np.ndarray, block_size: int) -> np.ndarray:
    n_blocks = -(-flat.size // block_size)
    padded = np.zeros(n_blocks * block_size, dtype=np.float32)
    padded[: flat.size] = flat
    return padded.reshape(n_blocks, block_size)


def _to_bfloat16_bits(flat: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even (as torch rounds)."""
    bits = flat.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def _from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Codes in [-7, 7] as 4-bit values (code + 8), two to a byte, the first in the low half."""
    nibbles = (codes.astype(np.int16) + 8).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(8))  # a zero code pads the last byte
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray, size: int) -> np.ndarray:
    nibbles = np.empty(packed.size * 2, dtype=np.uint8)
    nibbles[0::2] = packed & 0x0F
    nibbles[1::2] = packed >> 4
    return (nibbles[:size].astype(np.int16) - 8).astype(np.int8)


def _expect_keys(payload: Mapping[str, np.ndarray], keys: set[str]) -> None:
    if set(payload) != keys:
        raise CodecError(f"payload: arrays {sorted(keys)} expected, got {sorted(payload)}")


def _array(payload: Mapping[str, np.ndarray], key: str, dtype: type, size: int) -> np.ndarray:
    array = np.asarray(payload[key])
    if array.dtype != np.dtype(dtype) or array.ndim != 1 or array.size != size:
        raise CodecError(
            f"payload {key}: {size} values of {np.dtype(dtype).name} expected, "
            f"got shape {array.shape} of {array.dtype.name}"
        )
    return array
