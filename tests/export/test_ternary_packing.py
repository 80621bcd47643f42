"""TQ1_0 / TQ2_0 / I2_S packing against gguf-py and an independent unpacker."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from wftool.export.ternary_packing import pack_i2_s, pack_tq1_0, pack_tq2_0
from wftool.quant.ternary import ternarize


def _codes(rows=6, cols=512, seed=0):
    codes = np.random.default_rng(seed).integers(-1, 2, size=(rows, cols)).astype(np.int8)
    codes[1, :256] = 0  # an all-zero block: d must be 0, as llama.cpp writes it
    return codes


@pytest.mark.parametrize("pack,qtype", [(pack_tq2_0, GGMLQuantizationType.TQ2_0),
                                        (pack_tq1_0, GGMLQuantizationType.TQ1_0)])
def test_tq_bytes_equal_gguf_py_and_dequantize_exactly(pack, qtype):
    codes = _codes()
    packed = pack(codes)
    assert np.array_equal(packed, quants.quantize(codes.astype(np.float32), qtype))
    assert np.array_equal(quants.dequantize(packed, qtype), codes.astype(np.float32))


@pytest.mark.parametrize("pack", [pack_tq2_0, pack_tq1_0])
def test_tq_of_a_real_ternarized_weight_times_scale_is_delta_codes(pack):
    weight = torch.randn(4, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    codes, delta = ternarize(weight)
    qtype = GGMLQuantizationType.TQ2_0 if pack is pack_tq2_0 else GGMLQuantizationType.TQ1_0
    restored = quants.dequantize(pack(codes.numpy()), qtype) * delta.item()
    expected = (codes.float() * delta).numpy()
    assert np.array_equal(restored, expected)


def test_tq_rejects_rows_not_multiple_of_256_and_bad_codes():
    with pytest.raises(ValueError, match="multiple of 256.*\\(3, 576\\)"):
        pack_tq2_0(np.zeros((3, 576), dtype=np.int8))
    with pytest.raises(ValueError, match="in \\{-1, 0, 1\\}"):
        pack_tq1_0(np.full((1, 256), 2, dtype=np.int8))
    with pytest.raises(TypeError):
        pack_tq2_0(np.zeros((1, 256), dtype=np.float32))


def _unpack_i2_s(data: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """Straight from the layout description, one value at a time."""
    values = np.empty(n, dtype=np.int8)
    for group in range(n // 128):
        for j in range(32):
            byte = int(data[group * 32 + j])
            for k, shift in enumerate((6, 4, 2, 0)):
                values[group * 128 + j + 32 * k] = ((byte >> shift) & 3) - 1
    delta = float(np.frombuffer(data[n // 4 : n // 4 + 4].tobytes(), dtype="<f4")[0])
    return values, delta


def test_i2_s_round_trips_through_an_independent_unpacker():
    codes = _codes(rows=3, cols=384, seed=2)
    packed = pack_i2_s(codes, 0.0123)
    assert packed.dtype == np.uint8 and packed.size == codes.size // 4 + 32
    values, delta = _unpack_i2_s(packed, codes.size)
    assert np.array_equal(values, codes.reshape(-1))
    assert delta == pytest.approx(np.float32(0.0123))
    assert not packed[codes.size // 4 + 4 :].any()


def test_i2_s_rejects_partial_groups():
    with pytest.raises(ValueError, match="multiple of 128"):
        pack_i2_s(np.zeros(100, dtype=np.int8), 1.0)
