"""A tiny Llama student written for llama.cpp's `bitnet` architecture, read back exactly."""

import numpy as np
import pytest

from tests.conftest import require_llamacpp, tiny_llama
from wftool.export.gguf_bitnet import bitnet_export_problems, write_bitnet_gguf
from wftool.export.validate import check_gguf_tensors
from wftool.model.families import FAMILIES
from wftool.model.surgery import convert_to_bitnet
from wftool.model.tokenizer import train_synthetic_tokenizer


@pytest.fixture(scope="module")
def student():
    model = tiny_llama(vocab_size=512, hidden_size=256, intermediate_size=512,
                       num_attention_heads=4, num_key_value_heads=2)
    convert_to_bitnet(model, FAMILIES["llama"])
    return model, train_synthetic_tokenizer(512)


@pytest.mark.parametrize("export_type", ["tq2_0", "tq1_0", "f16", "bf16"])
def test_export_reads_back_exactly(tmp_path, student, export_type):
    from gguf import GGUFReader

    model, tokenizer = student
    family = FAMILIES["llama"]
    assert bitnet_export_problems(model, family, "paper", 1.0, export_type) == []
    path = tmp_path / f"m-{export_type}.gguf"
    written = write_bitnet_gguf(model, tokenizer, family, export_type, path)
    assert check_gguf_tensors(path, model, family, written) == []
    reader = GGUFReader(str(path))
    fields = reader.fields
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    assert arch == "bitnet"
    assert int(fields["bitnet.block_count"].parts[-1][0]) == 2
    assert len(fields["tokenizer.ggml.tokens"].data) == 512
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output_norm.weight", "blk.0.attn_sub_norm.weight",
            "blk.1.ffn_sub_norm.weight", "blk.0.attn_q.scale"} <= names
    assert "output.weight" not in names  # tied embeddings only


def test_corrupted_file_is_caught_by_the_read_back(tmp_path, student):
    model, tokenizer = student
    family = FAMILIES["llama"]
    path = tmp_path / "m.gguf"
    written = write_bitnet_gguf(model, tokenizer, family, "tq2_0", path)
    # Flip the codes of one tensor in the file: the read-back must notice.
    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.0.attn_q.weight")
    data = bytearray(path.read_bytes())
    start = int(tensor.data_offset)
    data[start] ^= 0b01
    path.write_bytes(bytes(data))
    problems = check_gguf_tensors(path, model, family, written)
    assert any("blk.0.attn_q.weight" in p for p in problems)


def test_models_that_bitnet_cannot_hold_are_listed():
    from tests.conftest import tiny_qwen3

    family = FAMILIES["llama"]
    narrow = tiny_llama()  # hidden 64: rows are not multiples of 256
    convert_to_bitnet(narrow, family)
    problems = bitnet_export_problems(narrow, family, "paper", 0.5, "tq2_0")
    assert any("not a multiple of 256" in p for p in problems)
    assert any("warm-up is unfinished" in p for p in problems)
    qwen = tiny_qwen3()
    convert_to_bitnet(qwen, FAMILIES["qwen3"])
    problems = bitnet_export_problems(qwen, FAMILIES["qwen3"], "paper", 1.0, "f16")
    assert any("QK-norm" in p for p in problems) and any("not tied" in p for p in problems)


def test_export_command_writes_and_validates_the_tiny_student(tmp_path):
    from typer.testing import CliRunner

    from wftool.cli import app

    runner = CliRunner()
    student = tmp_path / "student"
    assert runner.invoke(app, ["convert", "tiny", "--output", str(student)]).exit_code == 0
    out = tmp_path / "tiny.gguf"
    result = runner.invoke(app, ["export-gguf", str(student), "--type", "tq1_0",
                                 "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert out.exists() and "every ternary value exact" in result.output
    unsupported = runner.invoke(app, ["export-gguf", str(student), "--type", "i2_s",
                                      "--output", str(tmp_path / "x.gguf")])
    assert unsupported.exit_code == 2 and "not available yet" in unsupported.output


def test_export_command_explains_why_a_model_cannot_go_to_bitnet(tmp_path):
    from typer.testing import CliRunner

    from wftool.cli import app

    runner = CliRunner()
    student = tmp_path / "student"
    result = runner.invoke(app, ["convert", "tiny", "--output", str(student),
                                 "convert.sub_norm=all"])
    assert result.exit_code == 0, result.output
    refused = runner.invoke(app, ["export-gguf", str(student), "--output",
                                  str(tmp_path / "x.gguf")])
    assert refused.exit_code == 2
    text = " ".join(refused.output.split())  # rich wraps long lines
    assert "placement 'all'" in text and "wft serve --backend torch" in text
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("export_type", ["tq2_0", "f16"])
def test_llamacpp_runs_the_export_like_pytorch(tmp_path, student, export_type):
    require_llamacpp()
    from wftool.export.validate import compare_with_llamacpp

    model, tokenizer = student
    path = tmp_path / f"m-{export_type}.gguf"
    write_bitnet_gguf(model, tokenizer, FAMILIES["llama"], export_type, path)
    prompts = ["kiza pa povo vo zafi zi lu domilu sabula zavize nibo zuze"]
    stats = compare_with_llamacpp(path, model, tokenizer, export_type, prompts=prompts)
    assert stats["problems"] == []
    assert stats["rel_rms"] < (2e-3 if export_type == "f16" else 5e-2)
    assert stats["decode_tok_s"] > 0


def test_llamacpp_comparison_catches_a_wrong_scale(tmp_path, student):
    require_llamacpp()
    from gguf import GGUFReader

    from wftool.export.validate import compare_with_llamacpp

    model, tokenizer = student
    path = tmp_path / "m.gguf"
    write_bitnet_gguf(model, tokenizer, FAMILIES["llama"], "f16", path)
    scale = next(t for t in GGUFReader(str(path)).tensors if t.name == "blk.1.ffn_down.scale")
    data = bytearray(path.read_bytes())
    offset = int(scale.data_offset)
    value = np.frombuffer(bytes(data[offset:offset + 4]), dtype="<f4")[0]
    data[offset:offset + 4] = np.array([value * 8], dtype="<f4").tobytes()
    path.write_bytes(bytes(data))
    stats = compare_with_llamacpp(path, model, tokenizer, "f16",
                                  prompts=["kiza pa povo vo zafi zi lu domilu"])
    assert any("rel RMS" in p for p in stats["problems"])
