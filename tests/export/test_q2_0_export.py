"""Q2_0 GGUF files (llama.cpp's type 42, GPU kernels): a `bitnet` student with d = 1 and F32
`.scale` tensors, a `llama` student with d = fp16(delta), read back exactly with wft's own
parser (gguf-py does not know type 42) and run by llama.cpp like PyTorch; rows of 64 x k,
which TQ types refuse."""

import numpy as np
import pytest

from tests.conftest import require_llamacpp, tiny_llama_student
from tests.export.cli import convert_tiny, export
from tests.export.q2_0 import reference_unpack_q2_0
from wftool.export.gguf_layout import read_gguf_layout
from wftool.export.gguf_target import GgufTarget, plan_gguf_export
from wftool.export.gguf_writer import llama_rope_permute, write_gguf
from wftool.export.validate import check_gguf_tensors, compare_with_llamacpp
from wftool.model.families import FAMILIES
from wftool.model.tokenizer import train_synthetic_tokenizer
from wftool.quant.ternary import ternarize
from wftool.runtime.llamacpp import llamacpp_available

FAMILY = FAMILIES["llama"]
F32, Q2_0 = 0, 42
PROMPTS = ["kiza pa povo vo zafi zi lu domilu sabula zavize nibo zuze"]
# hidden 192 and FFN 320: whole Q2_0 blocks (64), not whole TQ blocks (256).
NARROW = {"hidden_size": 192, "intermediate_size": 320, "num_attention_heads": 3,
          "num_key_value_heads": 1}


def _write(model, tokenizer, sub_norm, path, export_type="q2_0"):
    target, problems = plan_gguf_export(model, FAMILY, sub_norm, 1.0, export_type)
    assert problems == []
    return target, write_gguf(model, tokenizer, FAMILY, target, path)


@pytest.fixture(scope="module")
def tokenizer():
    return train_synthetic_tokenizer(512)


@pytest.fixture(scope="module", params=["paper", "none"])
def exported(request, tmp_path_factory, tokenizer):
    """(sub_norm, model, target, written, path) of a Q2_0 export per architecture."""
    model = tiny_llama_student(request.param)
    path = tmp_path_factory.mktemp("q2_0") / "m.gguf"
    return (request.param, model, *_write(model, tokenizer, request.param, path), path)


def _raw(path, name, n):
    entry = read_gguf_layout(path).tensor(name)
    return np.fromfile(path, dtype=np.uint8)[entry.offset:entry.offset + n // 64 * 18]


def test_q2_0_export_reads_back_exactly(exported):
    sub_norm, model, target, written, path = exported
    assert target == GgufTarget("bitnet" if sub_norm == "paper" else "llama", "q2_0")
    assert check_gguf_tensors(path, model, target, written) == []
    layout = read_gguf_layout(path)
    assert layout.metadata["general.file_type"] == 41  # LLAMA_FTYPE_MOSTLY_Q2_0
    types = {t.name: t.type_id for t in layout.tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == Q2_0
    assert layout.tensor("blk.0.ffn_down.weight").shape == (256, 512)
    assert any(n.endswith(".scale") for n in types) == (sub_norm == "paper")


def test_q2_0_blocks_hold_the_codes_and_d_as_the_architecture_needs(exported):
    sub_norm, model, target, _, path = exported
    layout = read_gguf_layout(path)
    data = np.fromfile(path, dtype=np.uint8)
    attention = model.model.layers[1].self_attn
    for name, proj, heads in (("attn_q", attention.q_proj, 4), ("attn_v", attention.v_proj, None)):
        codes, delta = ternarize(proj.weight)
        codes = codes.numpy()
        if heads and sub_norm == "none":  # llama.cpp's `llama` RoPE: Q/K rows permuted
            codes = llama_rope_permute(codes, heads)
        values, d = reference_unpack_q2_0(_raw(path, f"blk.1.{name}.weight", codes.size),
                                          codes.size)
        assert np.array_equal(values, codes.reshape(-1))  # never code 0b11 (+2)
        if sub_norm == "paper":  # d = 1, delta exact in the F32 .scale tensor
            assert (d == 1.0).all()
            scale = layout.tensor(f"blk.1.{name}.scale")
            assert scale.type_id == F32 and scale.shape == (1,)
            stored = data[scale.offset:scale.offset + 4].view("<f4")[0]
            assert stored == np.float32(delta.item())
        else:  # d = fp16(delta), rounded as the TQ types round it for `llama`
            assert (d == np.float32(np.float16(delta.item()))).all()
            assert d[0] != np.float32(delta.item())


def test_corrupted_q2_0_codes_d_or_scale_are_caught(tmp_path, tokenizer):
    model = tiny_llama_student("paper")
    path = tmp_path / "m.gguf"
    target, written = _write(model, tokenizer, "paper", path)
    layout = read_gguf_layout(path)
    weight, scale = layout.tensor("blk.1.attn_v.weight"), layout.tensor("blk.1.attn_v.scale")
    pristine = path.read_bytes()
    # A code byte (bits 0-1 flipped), the fp16 d of block 0, the F32 .scale.
    for where, flip in ((weight.offset + 2, 0b11), (weight.offset, 0x01),
                        (scale.offset + 3, 0x01)):
        data = bytearray(pristine)
        data[where] ^= flip
        path.write_bytes(bytes(data))
        problems = check_gguf_tensors(path, model, target, written)
        assert any(p.startswith("blk.1.attn_v.") for p in problems), problems


def test_rows_of_64_times_k_go_to_q2_0_where_tq_types_refuse(tmp_path, tokenizer):
    model = tiny_llama_student("paper", **NARROW)
    _, problems = plan_gguf_export(model, FAMILY, "paper", 1.0, "tq2_0")
    [rows] = problems
    assert "q_proj.weight (192, 192): rows of 192 are not a multiple of 256 (TQ2_0)" in \
        rows.reason
    assert "or q2_0" in rows.fix
    path = tmp_path / "narrow.gguf"
    target, written = _write(model, tokenizer, "paper", path)
    assert check_gguf_tensors(path, model, target, written) == []
    assert read_gguf_layout(path).tensor("blk.0.ffn_down.weight").shape == (192, 320)


def test_a_row_length_not_a_multiple_of_64_is_refused_naming_the_tensor():
    model = tiny_llama_student("paper", hidden_size=96, intermediate_size=192, num_attention_heads=2,
                     num_key_value_heads=1)
    _, problems = plan_gguf_export(model, FAMILY, "paper", 1.0, "q2_0")
    [rows] = problems
    assert "q_proj.weight (96, 96): rows of 96 are not a multiple of 64 (Q2_0)" in rows.reason
    assert "--type f16 or bf16" in rows.fix and "q2_0" not in rows.fix


@pytest.mark.parametrize("sub_norm,shape", [("paper", {}), ("none", {}), ("paper", NARROW)],
                         ids=["bitnet", "llama", "bitnet-hidden-192"])
def test_llamacpp_runs_the_q2_0_export_like_pytorch(tmp_path, tokenizer, sub_norm, shape):
    require_llamacpp()
    model = tiny_llama_student(sub_norm, **shape)
    path = tmp_path / "m.gguf"
    _write(model, tokenizer, sub_norm, path)
    stats = compare_with_llamacpp(path, model, tokenizer, "q2_0", prompts=PROMPTS)
    assert stats["problems"] == []
    assert stats["rel_rms"] < 5e-2  # as for TQ types: llama.cpp's 8-bit activations
    assert stats["top1"] >= 0.98 and stats["decode_tok_s"] > 0
    from wftool.eval.llamacpp import LlamaCppModel

    assert LlamaCppModel(path, 64, 1).file_type == "Q2_0"  # the name `wft eval` shows


def test_export_command_writes_and_validates_q2_0(tmp_path):
    from wftool.recipe.load import load_recipe

    assert load_recipe("tiny", ["export.type=q2_0"]).export.type == "q2_0"
    out = tmp_path / "tiny-q2_0.gguf"
    code, text = export(convert_tiny(tmp_path), out, "--type", "Q2_0")
    assert code == 0, text
    assert out.exists() and "bitnet, Q2_0" in text and "every ternary value exact" in text
    assert "fp32, as an F32 .scale tensor" in text
    if llamacpp_available():
        assert "logits rel RMS" in text and "FAILED" not in text
