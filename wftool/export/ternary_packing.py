"""Ternary codes -> the byte layouts of GGUF's TQ1_0 / TQ2_0 / Q2_0 and BitNet.cpp's I2_S.

The input is always `ternarize(W).codes` (int8 in {-1, 0, 1}), never latent weights. TQ and
Q2_0 blocks get d = `scale` rounded to fp16 (0 for an all-zero block, as llama.cpp's own
quantizers write it): d = 1 where the per-tensor delta travels separately as an F32 `.scale`
tensor (the `bitnet` architecture), d = delta where it must live in the blocks (`llama`).
The bytes equal what llama.cpp's quantizer (for TQ: gguf-py's) writes for the float tensor
`codes * fp16(scale)`. I2_S is BitNet.cpp's own type: 2-bit codes and the delta as fp32 in a
32-byte tail.
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # values per TQ block
TQ2_0_BLOCK_BYTES = 66  # 64 bytes of 2-bit codes + fp16 d
TQ1_0_BLOCK_BYTES = 54  # 48 bytes of base-3 codes + fp16 d
QK2_0 = 64  # values per Q2_0 block
Q2_0_BLOCK_BYTES = 18  # fp16 d + 16 bytes of 2-bit codes
Q2_0_TYPE_ID = 42  # GGML_TYPE_Q2_0 in llama.cpp; gguf-py 0.19 does not know it
Q2_0_FILE_TYPE = 41  # LLAMA_FTYPE_MOSTLY_Q2_0 (general.file_type)
I2_S_GROUP = 128  # values per 32-byte I2_S group (x86 layout)
I2_S_TAIL_BYTES = 32  # trailing bytes; the first 4 hold the fp32 delta
I2_S_TYPE_ID = 36  # GGML_TYPE_I2_S in BitNet.cpp's fork; upstream reuses ids past 35
I2_S_FILE_TYPE = 40  # LLAMA_FTYPE_MOSTLY_I2_S (general.file_type) in the same fork

# A base-3 number x in [0, 243) is stored as ceil(x * 256 / 243), so the decoder can take
# digits with a multiply and a shift; a table does that division once for all 243 values.
_BASE3_TO_BYTE = ((np.arange(243, dtype=np.uint32) * 256 + 242) // 243).astype(np.uint8)


def _checked_codes(codes: np.ndarray, row_multiple: int, kind: str) -> np.ndarray:
    """int8 codes in {-1, 0, 1} of a 2-D tensor whose rows are whole `row_multiple`s."""
    codes = np.asarray(codes)
    if codes.dtype != np.int8:
        raise TypeError(f"ternary codes must be int8, got {codes.dtype}")
    if codes.ndim != 2 or codes.shape[1] % row_multiple:
        raise ValueError(
            f"{kind} need rows of a multiple of {row_multiple} values; got shape {codes.shape}"
        )
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("codes must be in {-1, 0, 1}")
    return codes


def _blocks(codes: np.ndarray) -> tuple[np.ndarray, int]:
    codes = _checked_codes(codes, QK_K, "TQ types")
    blocks = codes.reshape(-1, QK_K)
    return blocks, codes.shape[0]


def _block_scales(blocks: np.ndarray, scale: float) -> np.ndarray:
    """fp16 d per block as 2 bytes: fp16(scale), or 0.0 where the block is all zeros."""
    d = blocks.any(axis=1).astype(np.float16) * np.float16(scale)
    return d.reshape(-1, 1).view(np.uint8)


def pack_tq2_0(codes: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """[rows, cols] int8 codes -> [rows, cols / 256 * 66] bytes of TQ2_0, block d = scale."""
    blocks, rows = _blocks(codes)
    q = (blocks + 1).astype(np.uint8).reshape(-1, 2, 4, 32)
    packed = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    out = np.concatenate([packed.reshape(-1, 64), _block_scales(blocks, scale)], axis=1)
    return out.reshape(rows, -1)


def pack_q2_0(codes: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """[rows, cols] int8 codes -> [rows, cols / 64 * 18] bytes of llama.cpp's Q2_0: per 64
    values the fp16 d (= scale), then 16 bytes where value j sits in byte j / 4 at bits
    2 * (j % 4), LSB first, as code + 1 (so 0b11, +2 d, is never written)."""
    codes = _checked_codes(codes, QK2_0, "Q2_0 tensors")
    blocks = codes.reshape(-1, QK2_0)
    q = (blocks + 1).astype(np.uint8).reshape(-1, QK2_0 // 4, 4)
    packed = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    out = np.concatenate([_block_scales(blocks, scale), packed], axis=1)
    return out.reshape(codes.shape[0], -1)


def pack_tq1_0(codes: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """[rows, cols] int8 codes -> [rows, cols / 256 * 54] bytes of TQ1_0 (base-3, 5 per byte),
    block d = scale."""
    blocks, rows = _blocks(codes)
    q = (blocks + 1).astype(np.uint8)
    base3 = np.concatenate(
        [
            _horner(q[:, :160].reshape(-1, 5, 32), 5),
            _horner(q[:, 160:240].reshape(-1, 5, 16), 5),
            # The last 16 values: 4 digits per byte, padded with a 0 digit (times 3).
            _horner(q[:, 240:].reshape(-1, 4, 4), 4) * np.uint8(3),
        ],
        axis=1,
    )
    out = np.concatenate([_BASE3_TO_BYTE[base3], _block_scales(blocks, scale)], axis=1)
    return out.reshape(rows, -1)


def _horner(digits: np.ndarray, n: int) -> np.ndarray:
    """sum_k digits[:, k] * 3^(n-1-k) in uint8 (at most 242, so it never overflows)."""
    value = digits[:, 0].copy()
    for k in range(1, n):
        value *= np.uint8(3)
        value += digits[:, k]
    return value


def pack_i2_s(codes: np.ndarray, delta: float) -> np.ndarray:
    """All codes of a tensor -> BitNet.cpp's x86 I2_S bytes: 2 bits per value (code + 1),
    each group of 128 values in 32 bytes (byte j holds values j, j+32, j+64, j+96 from the
    high bits down), then a 32-byte tail whose first 4 bytes are the fp32 delta and the rest
    zeros. This is `quantize_i2_s` of src/ggml-bitnet-mad.cpp on x86 builds with
    ACT_PARALLEL (the default in include/gemm-config.h) and on the 2024 releases; rows must
    be whole groups, since its kernels step through a row 128 values at a time."""
    codes = _checked_codes(codes, I2_S_GROUP, "I2_S tensors")
    flat = codes.reshape(-1)
    q = (flat + 1).astype(np.uint8).reshape(-1, 4, 32)
    packed = (q[:, 0] << 6) | (q[:, 1] << 4) | (q[:, 2] << 2) | q[:, 3]
    tail = np.zeros(I2_S_TAIL_BYTES, dtype=np.uint8)
    tail[:4] = np.array([delta], dtype="<f4").view(np.uint8)
    return np.concatenate([packed.reshape(-1), tail])
