"""Dequantising the GGML block formats a GGUF file may hold: gguf-py's own `gguf.quants.dequantize`
for every type it supports, and our own for the common types where ours is much faster.

`make bench` measures both on the same bytes (4M values each, on the development machine):
ours is 25x faster for Q8_0, 21x for Q4_0 and Q5_0, 14x for Q4_1, 7x for Q4_K, 4x for Q5_K and
Q6_K, and 500x for BF16, while F32/F16 run at par and so are left to the library. For every type
gguf-py supports and ours does not (Q2_K, Q3_K, the IQ and TQ formats, MXFP4, NVFP4...) the library
is used as is. tests/test_gguf.py compares each of ours with the library, bit for bit.

Each format stores a tensor row as a run of fixed-size blocks; every function here takes those blocks as
a `(n_blocks, type_size)` uint8 array and returns `(n_blocks, block_size)` float32 values. Everything is
vectorised over blocks with numpy, and the arithmetic is done in the same order as llama.cpp's reference
(`d * q + m`, `(d * sc) * q - dmin * m`...) so results agree with it bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import gguf.quants
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QK_K = 256  # elements in one super-block of the K formats
_K_SCALE_SIZE = 12  # bytes of packed 6-bit scales and mins in Q4_K / Q5_K

Dequantiser = Callable[[np.ndarray], np.ndarray]


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The little-endian fp16 at byte `start` of every block, as an (n_blocks, 1) float32 column."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Split packed bytes (n, k) into (n, 2, k): low nibbles first, then high nibbles.

    llama.cpp packs element j of a 2k-element group in the low nibble of byte j and element j + k in
    the high nibble, so the low half comes first.
    """
    return np.stack([qs & 0x0F, qs >> 4], axis=1)


def _bits(packed: np.ndarray, n_bits: int) -> np.ndarray:
    """Bit i of a little-endian bit field `packed` (n, n_bits / 8) as (n, n_bits) uint8 of 0/1."""
    return np.unpackbits(packed, axis=-1, count=n_bits, bitorder="little")


def dequantize_bf16(blocks: np.ndarray) -> np.ndarray:
    """BF16: the top 16 bits of a float32."""
    return (blocks.copy().view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0: fp16 scale d, then 32 int8 values; x = d * q."""
    d = _f16(blocks, 0)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return q * d


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """Q4_0: fp16 scale d, then 16 bytes of 4-bit values; x = d * (q - 8)."""
    d = _f16(blocks, 0)
    q = _nibbles(blocks[:, 2:]).reshape(len(blocks), 32).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_1: fp16 scale d and minimum m, then 16 bytes of 4-bit values; x = d * q + m."""
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibbles(blocks[:, 4:]).reshape(len(blocks), 32).astype(np.float32)
    return d * q + m


def _q5_values(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """5-bit values from 4 bytes of high bits (bit j is element j) and 16 bytes of nibbles."""
    low = _nibbles(qs).reshape(len(qs), 32)
    return low | (_bits(qh, 32) << 4)


def dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    """Q5_0: fp16 scale d, 32 high bits, 16 bytes of low nibbles; x = d * (q - 16)."""
    d = _f16(blocks, 0)
    q = _q5_values(blocks[:, 2:6], blocks[:, 6:]).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


def dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    """Q5_1: fp16 scale d and minimum m, 32 high bits, 16 bytes of low nibbles; x = d * q + m."""
    d, m = _f16(blocks, 0), _f16(blocks, 2)
    q = _q5_values(blocks[:, 4:8], blocks[:, 8:]).astype(np.float32)
    return d * q + m


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 8 six-bit scales and 8 six-bit mins of a Q4_K/Q5_K super-block from 12 bytes.

    Sub-blocks 0-3 keep scale and min in the low 6 bits of bytes 0-3 and 4-7; sub-blocks 4-7 take
    their low 4 bits from bytes 8-11 and their top 2 bits from the spare top bits of bytes 0-7.
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=1)
    mins = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 8, 32) 4-bit values of a K super-block: each 32-byte chunk holds two sub-blocks."""
    chunks = qs.reshape(len(qs), 4, 32)
    return np.stack([chunks & 0x0F, chunks >> 4], axis=2).reshape(len(qs), 8, 32)


def _k_affine(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """x = (d * scale) * q - dmin * min, per 32-element sub-block of a Q4_K/Q5_K super-block."""
    n = len(blocks)
    scales, mins = _k_scales_mins(blocks[:, 4:16])
    d = (_f16(blocks, 0) * scales).reshape(n, 8, 1)
    dm = (_f16(blocks, 2) * mins).reshape(n, 8, 1)
    return (d * q.astype(np.float32) - dm).reshape(n, QK_K)


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """Q4_K: fp16 d and dmin, 12 bytes of packed 6-bit scales/mins, 128 bytes of nibbles."""
    return _k_affine(blocks, _k_low_nibbles(blocks[:, 16:]))


def dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """Q5_K: Q4_K plus 32 bytes of high bits; bit i of byte l is sub-block i, element l."""
    n = len(blocks)
    high = _bits(blocks[:, 16:48].reshape(n * 32, 1), 8).reshape(n, 32, 8).transpose(0, 2, 1)
    q = _k_low_nibbles(blocks[:, 48:]) | (high << 4)
    return _k_affine(blocks, q)


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, fp16 d; x = d*sc*(q-32).

    Each half (128 values) uses 64 low-nibble bytes (low nibbles give values 0-63, high nibbles 64-127)
    and 32 high-bit bytes (bits 2k..2k+1 give values 32k..32k+31).
    """
    n = len(blocks)
    ql = blocks[:, :128].reshape(n, 2, 1, 64)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(n, 2, 128)
    qh = blocks[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    high = (qh & 0x03).reshape(n, 2, 128)
    q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).reshape(n, 16, 16)
    scales = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
    d = (_f16(blocks, 208) * scales).reshape(n, 16, 1)
    return (d * q.astype(np.float32)).reshape(n, QK_K)


# Ours, kept where the benchmark shows them much faster than gguf-py's (see the module docstring).
DEQUANTISERS: dict[GGMLQuantizationType, Dequantiser] = {
    GGMLQuantizationType.BF16: dequantize_bf16,
    GGMLQuantizationType.Q8_0: dequantize_q8_0,
    GGMLQuantizationType.Q4_0: dequantize_q4_0,
    GGMLQuantizationType.Q4_1: dequantize_q4_1,
    GGMLQuantizationType.Q5_0: dequantize_q5_0,
    GGMLQuantizationType.Q5_1: dequantize_q5_1,
    GGMLQuantizationType.Q4_K: dequantize_q4_k,
    GGMLQuantizationType.Q5_K: dequantize_q5_k,
    GGMLQuantizationType.Q6_K: dequantize_q6_k,
}


def is_supported(qtype: GGMLQuantizationType) -> bool:
    """Whether `dequantize` handles this GGML tensor type.

    Args:
        qtype: the tensor's GGML type.
    """
    return qtype in DEQUANTISERS or _library_supports(qtype)


@functools.cache
def _library_supports(qtype: GGMLQuantizationType) -> bool:
    """Whether gguf-py dequantises this type (asked of its public function, on one zero block)."""
    if qtype not in GGML_QUANT_SIZES:
        return False
    try:
        gguf.quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType, n_elements: int) -> np.ndarray:
    """Dequantise raw GGML data to a flat float32 array of `n_elements` values.

    Args:
        data: the tensor's bytes (any shape or dtype; it is reinterpreted as uint8).
        qtype: its GGML type; must satisfy `is_supported`.
        n_elements: how many values it holds.

    Raises:
        ValueError: if the byte count does not match `n_elements` of that type.
        KeyError: if the type is not supported.
    """
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if n_elements % block_size or raw.size != n_elements // block_size * type_size:
        raise ValueError(f"{raw.size} bytes do not hold {n_elements} {qtype.name} values")
    blocks = raw.reshape(-1, type_size)
    if qtype in DEQUANTISERS:
        return DEQUANTISERS[qtype](blocks).reshape(-1)
    if not _library_supports(qtype):
        raise KeyError(qtype.name)
    # np.array copies: F32/F16 come back as views of the (read-only, memory-mapped) file.
    return np.array(gguf.quants.dequantize(blocks, qtype), dtype=np.float32).reshape(-1)
