"""I2_S GGUF files for BitNet.cpp: header, declared type 36, shapes, tail delta, exact codes,
and data sizes as BitNet.cpp's loader computes them."""

from itertools import pairwise

import numpy as np
import pytest

from tests.conftest import tiny_llama
from tests.export.cli import convert_tiny, export
from tests.export.i2_s import reference_unpack_i2_s
from wftool.export.gguf_layout import read_gguf_layout
from wftool.export.gguf_target import plan_gguf_export
from wftool.export.gguf_writer import write_gguf
from wftool.export.validate import check_gguf_tensors
from wftool.model.families import FAMILIES
from wftool.model.surgery import convert_to_bitnet
from wftool.model.tokenizer import train_synthetic_tokenizer
from wftool.quant.ternary import ternarize

FAMILY = FAMILIES["llama"]
F32, F16, I2_S = 0, 1, 36


def _export(tmp_path, sub_norm, name="m.gguf"):
    model = tiny_llama(vocab_size=512, hidden_size=256, intermediate_size=384,
                       num_attention_heads=4, num_key_value_heads=2)
    convert_to_bitnet(model, FAMILY, sub_norm)
    target, problems = plan_gguf_export(model, FAMILY, sub_norm, 1.0, "i2_s")
    assert problems == []
    path = tmp_path / name
    written = write_gguf(model, train_synthetic_tokenizer(512), FAMILY, target, path)
    return model, target, written, path


@pytest.fixture(scope="module")
def bitnet_i2_s(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("i2s"), "paper")


def _nbytes(entry) -> int:
    """ggml_nbytes as BitNet.cpp's fork computes it: I2_S is n / 4 plus a 32-byte tail."""
    n = int(np.prod(entry.shape))
    return {F32: 4 * n, F16: 2 * n, I2_S: n // 4 + 32}[entry.type_id]


def test_i2_s_file_declares_type_36_and_bitnet_cpp_metadata(bitnet_i2_s):
    model, target, written, path = bitnet_i2_s
    assert check_gguf_tensors(path, model, target, written) == []
    layout = read_gguf_layout(path)
    meta = layout.metadata
    assert layout.version == 3 and meta["general.architecture"] == "bitnet"
    assert meta["general.file_type"] == 40  # LLAMA_FTYPE_MOSTLY_I2_S in BitNet.cpp's fork
    assert "BitNet.cpp" in meta["general.description"]
    assert meta["bitnet.attention.head_count_kv"] == 2
    types = {t.name: t.type_id for t in layout.tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == I2_S
    assert types["token_embd.weight"] == F16 and types["blk.0.attn_sub_norm.weight"] == F32
    # BitNet.cpp's I2_S matmul applies the tail delta itself: a .scale tensor would apply
    # it twice.
    assert not any(name.endswith(".scale") for name in types)
    assert layout.tensor("blk.0.ffn_down.weight").shape == (256, 384)


def test_i2_s_offsets_follow_ggml_nbytes_with_the_tail(bitnet_i2_s):
    _, _, _, path = bitnet_i2_s
    layout = read_gguf_layout(path)
    entries = sorted(layout.tensors, key=lambda t: t.offset)
    for before, after in pairwise(entries):
        padded = -(-_nbytes(before) // 32) * 32
        assert after.offset - before.offset == padded, before.name
    assert entries[-1].offset + _nbytes(entries[-1]) == layout.file_size


def test_i2_s_codes_and_tail_delta_are_exact(bitnet_i2_s):
    model, _, _, path = bitnet_i2_s
    layout = read_gguf_layout(path)
    data = np.fromfile(path, dtype=np.uint8)
    for name, proj in (("blk.0.attn_k", model.model.layers[0].self_attn.k_proj),
                       ("blk.1.ffn_down", model.model.layers[1].mlp.down_proj)):
        entry = layout.tensor(f"{name}.weight")
        codes, delta = ternarize(proj.weight)
        n = codes.numel()
        raw = data[entry.offset:entry.offset + n // 4 + 32]
        assert np.array_equal(reference_unpack_i2_s(raw, n)[0], codes.numpy().reshape(-1))
        assert raw[n // 4:n // 4 + 4].view("<f4")[0] == np.float32(delta.item())
        assert not raw[n // 4 + 4:].any()


def test_corrupted_codes_or_tail_are_caught(tmp_path):
    model, target, written, path = _export(tmp_path, "paper")
    entry = read_gguf_layout(path).tensor("blk.1.attn_v.weight")
    n = int(np.prod(entry.shape))
    pristine = path.read_bytes()
    for where, flip in ((entry.offset + 5, 0b11), (entry.offset + n // 4 + 1, 0x40)):
        data = bytearray(pristine)
        data[where] ^= flip
        path.write_bytes(bytes(data))
        problems = check_gguf_tensors(path, model, target, written)
        assert any(p.startswith("blk.1.attn_v.weight") for p in problems), problems


def test_a_llama_i2_s_export_has_permuted_q_and_k_and_no_sub_norms(tmp_path):
    from wftool.export.gguf_writer import llama_rope_permute

    model, target, written, path = _export(tmp_path, "none")
    assert target.arch == "llama"
    assert check_gguf_tensors(path, model, target, written) == []
    layout = read_gguf_layout(path)
    assert not any("sub_norm" in t.name or t.name.endswith(".scale") for t in layout.tensors)
    entry = layout.tensor("blk.0.attn_q.weight")
    codes, _ = ternarize(model.model.layers[0].self_attn.q_proj.weight)
    raw = np.fromfile(path, dtype=np.uint8)[entry.offset:entry.offset + codes.numel() // 4 + 32]
    permuted = llama_rope_permute(codes.numpy(), 4)
    assert np.array_equal(reference_unpack_i2_s(raw, codes.numel())[0], permuted.reshape(-1))


def test_export_command_writes_i2_s_and_says_only_bitnet_cpp_loads_it(tmp_path):
    out = tmp_path / "tiny-i2_s.gguf"
    code, text = export(convert_tiny(tmp_path), out, "--type", "i2_s")
    assert code == 0, text
    assert "bitnet, I2_S" in text and "BitNet.cpp only" in text
    assert "every ternary value exact" in text
    assert "skipped: I2_S loads only in BitNet.cpp" in text
