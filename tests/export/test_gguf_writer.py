"""Tiny Llama students written for llama.cpp's `bitnet` (paper SubLN) and `llama` (no
sub-norms) architectures, read back exactly and run by llama.cpp like PyTorch."""

import numpy as np
import pytest
import torch

from tests.conftest import require_llamacpp, tiny_llama_student
from tests.export.cli import convert_tiny, export
from wftool.export.gguf_target import GgufTarget, plan_gguf_export
from wftool.export.gguf_writer import write_gguf
from wftool.export.validate import check_gguf_tensors
from wftool.model.families import FAMILIES
from wftool.model.tokenizer import train_synthetic_tokenizer
from wftool.quant.ternary import ternarize

FAMILY = FAMILIES["llama"]
PROMPTS = ["kiza pa povo vo zafi zi lu domilu sabula zavize nibo zuze"]


@pytest.fixture(scope="module")
def tokenizer():
    return train_synthetic_tokenizer(512)


@pytest.fixture(scope="module")
def student():  # the paper's SubLN: llama.cpp's `bitnet`
    return tiny_llama_student("paper")


@pytest.fixture(scope="module")
def plain_student():  # no sub-norms: llama.cpp's `llama`
    return tiny_llama_student("none")


def _write(model, tokenizer, sub_norm, export_type, path):
    target, problems = plan_gguf_export(model, FAMILY, sub_norm, 1.0, export_type)
    assert problems == []
    return target, write_gguf(model, tokenizer, FAMILY, target, path)


def _fields(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("export_type", ["tq2_0", "tq1_0", "f16", "bf16"])
def test_bitnet_export_reads_back_exactly(tmp_path, student, tokenizer, export_type):
    path = tmp_path / f"m-{export_type}.gguf"
    target, written = _write(student, tokenizer, "paper", export_type, path)
    assert target == GgufTarget("bitnet", export_type) and target.scale_tensors
    assert check_gguf_tensors(path, student, target, written) == []
    reader, tensors = _fields(path)
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "bitnet"
    assert int(fields["bitnet.block_count"].parts[-1][0]) == 2
    assert len(fields["tokenizer.ggml.tokens"].data) == 512
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_sub_norm.weight",
            "blk.1.ffn_sub_norm.weight", "blk.0.attn_q.scale"} <= set(tensors)
    assert "output.weight" not in tensors  # tied embeddings only


@pytest.mark.parametrize("export_type", ["tq2_0", "tq1_0", "f16", "bf16"])
def test_llama_export_reads_back_exactly_with_delta_in_the_tensor(tmp_path, plain_student,
                                                                  tokenizer, export_type):
    from gguf import quants

    path = tmp_path / f"m-{export_type}.gguf"
    target, written = _write(plain_student, tokenizer, "none", export_type, path)
    assert target.arch == "llama" and not target.scale_tensors
    assert check_gguf_tensors(path, plain_student, target, written) == []
    reader, tensors = _fields(path)
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(reader.fields["llama.attention.head_count_kv"].parts[-1][0]) == 2
    assert not any(n.endswith(".scale") or "sub_norm" in n for n in tensors)
    # The delta is inside the tensor: v_proj (not permuted) reads back as codes x the
    # delta rounded as the type stores it.
    codes, delta = ternarize(plain_student.model.layers[1].self_attn.v_proj.weight)
    tensor = tensors["blk.1.attn_v.weight"]
    values = quants.dequantize(tensor.data, tensor.tensor_type).reshape(codes.shape)
    dtype = torch.bfloat16 if export_type == "bf16" else torch.float16
    rounded = delta.to(dtype).float()
    assert np.array_equal(values, (codes.float() * rounded).numpy())
    assert rounded != delta  # the rounding is real: the report says so
    if export_type == "tq2_0":  # the fp16 d of the first block, read from the raw bytes
        raw = np.asarray(tensor.data).reshape(-1)
        assert raw[64:66].view(np.float16)[0] == np.float16(delta.item())


def _converter_permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """LlamaModel.permute of llama.cpp's convert_hf_to_gguf.py, as written there."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def test_llama_export_permutes_q_and_k_like_llamacpps_converter(tmp_path, plain_student,
                                                                 tokenizer):
    from gguf import quants

    path = tmp_path / "m.gguf"
    _write(plain_student, tokenizer, "none", "f16", path)
    _, tensors = _fields(path)
    attention = plain_student.model.layers[0].self_attn
    for name, proj, heads in (("attn_q", attention.q_proj, 4), ("attn_k", attention.k_proj, 2)):
        # The converter permutes the Hugging Face weight; ternarizing commutes with a row
        # permutation, so the file must hold permute(W) quantized.
        expected = ternary_values(_converter_permute(proj.weight.detach(), heads))
        tensor = tensors[f"blk.0.{name}.weight"]
        values = quants.dequantize(tensor.data, tensor.tensor_type).reshape(expected.shape)
        assert np.array_equal(values, expected)
        assert not np.array_equal(values, ternary_values(proj.weight.detach()))


def ternary_values(weight: torch.Tensor) -> np.ndarray:
    codes, delta = ternarize(weight)
    return (codes.float() * delta.half().float()).numpy()


def test_corrupted_file_is_caught_by_the_read_back(tmp_path, student, tokenizer):
    from gguf import GGUFReader

    path = tmp_path / "m.gguf"
    target, written = _write(student, tokenizer, "paper", "tq2_0", path)
    # Flip the codes of one tensor in the file: the read-back must notice.
    tensor = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.0.attn_q.weight")
    data = bytearray(path.read_bytes())
    data[int(tensor.data_offset)] ^= 0b01
    path.write_bytes(bytes(data))
    problems = check_gguf_tensors(path, student, target, written)
    assert any("blk.0.attn_q.weight" in p for p in problems)


def test_export_command_writes_and_validates_the_tiny_student(tmp_path):
    student = convert_tiny(tmp_path)
    out = tmp_path / "tiny.gguf"
    code, text = export(student, out, "--type", "tq1_0")
    assert code == 0, text
    assert out.exists() and "every ternary value exact" in text and "bitnet, TQ1_0" in text
    code, text = export(student, tmp_path / "x.gguf", "--type", "q4_0")
    assert code == 2 and "not available" in text


def test_export_command_sends_a_student_without_sub_norms_to_llama(tmp_path):
    student = convert_tiny(tmp_path, "convert.sub_norm=none")
    code, text = export(student, tmp_path / "plain.gguf", "--type", "tq2_0", "--no-validate")
    assert code == 0, text
    assert "llama, TQ2_0" in text and "fp16, as the block scale d" in text


def test_export_command_explains_why_a_model_cannot_go_to_gguf(tmp_path):
    student = convert_tiny(tmp_path, "convert.sub_norm=all")
    code, text = export(student, tmp_path / "x.gguf")
    assert code == 2
    assert "placement 'all'" in text and "wft serve --backend torch" in text
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("sub_norm,export_type", [("paper", "tq2_0"), ("paper", "f16"),
                                                  ("none", "tq2_0"), ("none", "f16")])
def test_llamacpp_runs_the_export_like_pytorch(tmp_path, student, plain_student, tokenizer,
                                               sub_norm, export_type):
    require_llamacpp()
    from wftool.export.validate import compare_with_llamacpp

    model = student if sub_norm == "paper" else plain_student
    path = tmp_path / f"m-{export_type}.gguf"
    _write(model, tokenizer, sub_norm, export_type, path)
    stats = compare_with_llamacpp(path, model, tokenizer, export_type, prompts=PROMPTS)
    assert stats["problems"] == []
    assert stats["rel_rms"] < (2e-3 if export_type == "f16" else 5e-2)
    assert stats["top1"] >= 0.98 and stats["decode_tok_s"] > 0


def test_llamacpp_runs_an_untied_llama_export_like_pytorch(tmp_path, tokenizer):
    require_llamacpp()
    from wftool.export.validate import compare_with_llamacpp

    model = tiny_llama_student("none", tie_word_embeddings=False)
    path = tmp_path / "untied.gguf"
    _, written = _write(model, tokenizer, "none", "f16", path)
    assert "output.weight" in {t.name for t in written}
    stats = compare_with_llamacpp(path, model, tokenizer, "f16", prompts=PROMPTS)
    assert stats["problems"] == [] and stats["rel_rms"] < 2e-3


def test_llamacpp_comparison_catches_unpermuted_q_and_k(tmp_path, plain_student, tokenizer,
                                                        monkeypatch):
    require_llamacpp()
    from wftool.export import gguf_writer
    from wftool.export.validate import compare_with_llamacpp

    monkeypatch.setattr(gguf_writer, "llama_rope_permute", lambda rows, heads: rows)
    path = tmp_path / "unpermuted.gguf"
    _write(plain_student, tokenizer, "none", "f16", path)
    stats = compare_with_llamacpp(path, plain_student, tokenizer, "f16", prompts=PROMPTS)
    assert any("rel RMS" in p for p in stats["problems"])


def test_llamacpp_comparison_catches_a_wrong_scale(tmp_path, student, tokenizer):
    require_llamacpp()
    from gguf import GGUFReader

    from wftool.export.validate import compare_with_llamacpp

    path = tmp_path / "m.gguf"
    _write(student, tokenizer, "paper", "f16", path)
    scale = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.1.ffn_down.scale")
    data = bytearray(path.read_bytes())
    offset = int(scale.data_offset)
    value = np.frombuffer(bytes(data[offset:offset + 4]), dtype="<f4")[0]
    data[offset:offset + 4] = np.array([value * 8], dtype="<f4").tobytes()
    path.write_bytes(bytes(data))
    stats = compare_with_llamacpp(path, student, tokenizer, "f16", prompts=PROMPTS[:1])
    assert any("rel RMS" in p for p in stats["problems"])


def test_the_read_back_checks_every_tensors_type(tmp_path, student, tokenizer, monkeypatch):
    from wftool.export import gguf_writer

    # A writer that stores embeddings and F16 projections as F32: every value still reads
    # back exactly, only the types are wrong.
    monkeypatch.setattr(gguf_writer, "_float_array",
                        lambda tensor, kind: (tensor.detach().float().numpy(), None))
    path = tmp_path / "m.gguf"
    target, written = _write(student, tokenizer, "paper", "f16", path)
    problems = check_gguf_tensors(path, student, target, written)
    assert "token_embd.weight: GGML type F32 (0), expected F16 (1)" in problems
    assert "blk.0.attn_q.weight: GGML type F32 (0), expected F16 (1)" in problems
    assert not any("norm" in p for p in problems)  # norms are F32 by design


def test_decode_speed_is_timed_from_the_first_token():
    from wftool.export.validate import decode_rate

    now = [0.0]

    def tokens():  # 0.5 s of prompt processing, then a token every 10 ms
        now[0] += 0.5
        for i in range(100):
            yield i
            now[0] += 0.01

    rate = decode_rate(tokens(), 11, clock=lambda: now[0])
    assert rate == pytest.approx(100.0)  # 10 tokens in 0.1 s; with the prompt: 11 / 0.6 s
    assert np.isnan(decode_rate(iter([1]), 5))
