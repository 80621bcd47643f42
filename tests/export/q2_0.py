"""Q2_0 written from llama.cpp's description (ggml-common.h, ggml-quants.c), independent of
wft's packer and of the read-back's dequantizer (wftool.export.validate.dequantize_q2_0)."""

import struct

import numpy as np


def reference_unpack_q2_0(data, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n int8 codes, one float32 d per 64 values), one value at a time: block b is bytes
    18b..18b+17, an fp16 d then qs[16]; value j of it is (qs[j // 4] >> 2 * (j % 4)) & 3,
    which stands for code - 1 (so 0b11 reads as +2)."""
    raw = bytes(np.asarray(data, dtype=np.uint8).reshape(-1))
    codes, scales = [], []
    for block in range(n // 64):
        base = block * 18
        scales.append(struct.unpack_from("<e", raw, base)[0])
        for j in range(64):
            codes.append(((raw[base + 2 + j // 4] >> (2 * (j % 4))) & 3) - 1)
    return np.array(codes, dtype=np.int8), np.array(scales, dtype=np.float32)


def reference_quantize_q2_0(weight: np.ndarray) -> np.ndarray:
    """quantize_row_q2_0_ref of a float [rows, cols] tensor: per 64 values d = absmax, stored
    as fp16; code = clamp(round(w / d) + 1, 0, 3), C's roundf (half away from zero)."""
    blocks = np.asarray(weight, dtype=np.float32).reshape(-1, 64)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    inverse = np.divide(1.0, amax, out=np.zeros_like(amax), where=amax > 0)
    scaled = blocks * inverse
    rounded = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    q = np.clip(rounded + 1, 0, 3).astype(np.uint8)
    qs = np.zeros((blocks.shape[0], 16), dtype=np.uint8)
    for j in range(64):
        qs[:, j // 4] |= q[:, j] << (2 * (j % 4))
    d = amax.astype(np.float16).view(np.uint8)
    return np.concatenate([d, qs], axis=1).reshape(weight.shape[0], -1)
