"""TQ1_0 / TQ2_0 / Q2_0 / I2_S packing against gguf-py and independent unpackers."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from tests.export.i2_s import reference_unpack_i2_s
from tests.export.q2_0 import reference_quantize_q2_0, reference_unpack_q2_0
from wftool.export.ternary_packing import pack_i2_s, pack_q2_0, pack_tq1_0, pack_tq2_0
from wftool.export.validate import dequantize_q2_0, unpack_i2_s
from wftool.quant.ternary import ternarize

TQ = [(pack_tq2_0, GGMLQuantizationType.TQ2_0), (pack_tq1_0, GGMLQuantizationType.TQ1_0)]


def _codes(rows=6, cols=512, seed=0):
    codes = np.random.default_rng(seed).integers(-1, 2, size=(rows, cols)).astype(np.int8)
    codes[1, :256] = 0  # an all-zero block: d must be 0, as llama.cpp writes it
    return codes


@pytest.mark.parametrize("pack,qtype", TQ)
def test_tq_bytes_equal_gguf_py_and_dequantize_exactly(pack, qtype):
    codes = _codes()
    packed = pack(codes)
    assert np.array_equal(packed, quants.quantize(codes.astype(np.float32), qtype))
    assert np.array_equal(quants.dequantize(packed, qtype), codes.astype(np.float32))


@pytest.mark.parametrize("pack,qtype", TQ)
def test_tq_with_the_delta_as_block_scale_equals_gguf_py(pack, qtype):
    # The `llama` architecture has no .scale tensor: d = fp16(delta) in every block.
    codes, delta = _codes(seed=3), 0.0123456
    weight = codes.astype(np.float32) * np.float32(np.float16(delta))
    packed = pack(codes, delta)
    assert np.array_equal(packed, quants.quantize(weight, qtype))
    assert np.array_equal(quants.dequantize(packed, qtype), weight)


@pytest.mark.parametrize("pack,qtype", TQ)
def test_tq_of_a_real_ternarized_weight_times_scale_is_delta_codes(pack, qtype):
    weight = torch.randn(4, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    codes, delta = ternarize(weight)
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


def test_i2_s_round_trips_through_an_independent_unpacker():
    codes = _codes(rows=3, cols=384, seed=2)
    packed = pack_i2_s(codes, 0.0123)
    assert packed.dtype == np.uint8 and packed.size == codes.size // 4 + 32
    values, delta = reference_unpack_i2_s(packed, codes.size)
    assert np.array_equal(values, codes.reshape(-1))
    assert delta == np.float32(0.0123)
    assert not packed[codes.size // 4 + 4 :].any()


def test_i2_s_first_byte_by_hand():
    # Values 0, 32, 64, 96 of a group share byte 0, from the high bits down, as code + 1:
    # +1 -> 0b10, -1 -> 0b00, 0 -> 0b01, +1 -> 0b10.
    codes = np.zeros((1, 128), dtype=np.int8)
    codes[0, [0, 32, 64, 96]] = [1, -1, 0, 1]
    packed = pack_i2_s(codes, 1.0)
    assert packed[0] == 0b10_00_01_10
    assert (packed[1:32] == 0b01_01_01_01).all()  # all zeros elsewhere: code 1 everywhere
    assert packed[32:36].tobytes() == np.float32(1.0).tobytes()


def test_the_read_back_unpacker_agrees_with_the_reference_one():
    # Arbitrary bytes (not wft's packer output): both readers of the layout must agree.
    data = np.random.default_rng(4).integers(0, 256, size=3 * 32 + 32, dtype=np.uint8)
    expected, expected_delta = reference_unpack_i2_s(data, 3 * 128)
    values, delta = unpack_i2_s(data, 3 * 128)
    assert np.array_equal(values, expected)
    assert delta == expected_delta or (np.isnan(delta) and np.isnan(expected_delta))


def test_i2_s_rejects_partial_groups_naming_the_shape():
    with pytest.raises(ValueError, match="multiple of 128.*\\(4, 100\\)"):
        pack_i2_s(np.zeros((4, 100), dtype=np.int8), 1.0)
    with pytest.raises(ValueError, match="in \\{-1, 0, 1\\}"):
        pack_i2_s(np.full((1, 128), -2, dtype=np.int8), 1.0)


@pytest.mark.parametrize("scale", [1.0, 0.0123456])
def test_q2_0_round_trips_through_an_independent_unpacker(scale):
    codes = _codes(rows=3, cols=576, seed=5)  # SmolLM2-135M's width: 9 blocks of 64
    codes[2, 64:128] = 0  # an all-zero block: d = 0, as llama.cpp's quantizer writes it
    packed = pack_q2_0(codes, scale)
    assert packed.dtype == np.uint8 and packed.shape == (3, 576 // 64 * 18)
    values, d = reference_unpack_q2_0(packed, codes.size)
    assert np.array_equal(values, codes.reshape(-1))
    nonzero = codes.reshape(-1, 64).any(axis=1)
    assert np.array_equal(d, np.where(nonzero, np.float32(np.float16(scale)), 0))
    restored = dequantize_q2_0(packed).reshape(codes.shape)
    assert np.array_equal(restored, codes * np.float32(np.float16(scale)))


@pytest.mark.parametrize("scale", [1.0, 0.0123456])
def test_q2_0_bytes_equal_llamacpps_reference_quantizer(scale):
    # quantize_row_q2_0_ref of codes x fp16(scale): block absmax = fp16(scale), codes back.
    codes = _codes(rows=4, cols=192, seed=6)
    weight = codes.astype(np.float32) * np.float32(np.float16(scale))
    assert np.array_equal(pack_q2_0(codes, scale), reference_quantize_q2_0(weight))


def test_q2_0_first_block_by_hand():
    # d (fp16 1.0 = 0x3C00, little endian) comes first; then value j in byte j // 4 at bits
    # 2 * (j % 4), LSB first, as code + 1: +1 -> 0b10, -1 -> 0b00, 0 -> 0b01, +1 -> 0b10.
    codes = np.zeros((1, 64), dtype=np.int8)
    codes[0, :4] = [1, -1, 0, 1]
    packed = pack_q2_0(codes)
    assert packed[0, :2].tobytes() == b"\x00\x3c"
    assert packed[0, 2] == 0b10_01_00_10
    assert (packed[0, 3:] == 0b01_01_01_01).all()  # zeros elsewhere: code 1 everywhere


def test_the_q2_0_read_back_decodes_every_code_as_llamacpp_does():
    # Arbitrary bytes (code 3 = +2 d included): both readers of the layout must agree.
    data = np.random.default_rng(7).integers(0, 256, size=(5, 18), dtype=np.uint8)
    data[:, :2] = np.array([0.5, -2.0, 0.0, 1.0, 0.0123], dtype="<f2").view(np.uint8).reshape(5, 2)
    codes, d = reference_unpack_q2_0(data, 5 * 64)
    expected = codes.reshape(5, 64).astype(np.float32) * d[:, None]
    assert np.array_equal(dequantize_q2_0(data), expected.reshape(-1))
    assert (codes == 2).any()


def test_q2_0_rejects_rows_not_multiple_of_64_and_bad_codes():
    with pytest.raises(ValueError, match="Q2_0 .* multiple of 64.*\\(3, 100\\)"):
        pack_q2_0(np.zeros((3, 100), dtype=np.int8))
    with pytest.raises(ValueError, match="in \\{-1, 0, 1\\}"):
        pack_q2_0(np.full((1, 64), 2, dtype=np.int8))
