"""Mixtral-shaped students without sub-norms go to llama.cpp's `llama` graph with Mixtral's
expert tensors: the F32 router `ffn_gate_inp` and 3-D `ffn_{gate,up,down}_exps` whose
blocks carry each expert matrix's own delta. They read back exactly and run in llama.cpp
like PyTorch. MoE students with sub-norms and Qwen MoE students are refused, with a fix."""

import numpy as np
import pytest
import torch

from tests.conftest import require_llamacpp
from tests.export.q2_0 import reference_unpack_q2_0
from wftool.commands.export import run_export
from wftool.export.gguf_layout import read_gguf_layout
from wftool.export.gguf_target import GgufTarget, plan_gguf_export
from wftool.export.gguf_writer import expert_codes, write_gguf
from wftool.export.validate import check_gguf_tensors, compare_with_llamacpp
from wftool.model.checkpoint import TernaryMetadata, save_model_dir
from wftool.model.families import FAMILIES
from wftool.model.surgery import convert_to_bitnet
from wftool.model.tokenizer import train_synthetic_tokenizer

MIXTRAL = FAMILIES["mixtral"]
F32, Q2_0 = 0, 42
TYPES = ("tq2_0", "tq1_0", "q2_0")
PROMPTS = ["kiza pa povo vo zafi zi lu domilu sabula zavize nibo zuze"]
# Widths every ternary GGUF type holds: rows of 256 (hidden) and 512 (expert FFN).
SHAPE = dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def _spread_routing(model):
    # A router of std 0.02 sends every token to near-tied experts; a wider one makes top-2
    # decisive, so llama.cpp and PyTorch pick the same experts.
    for name, param in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            torch.nn.init.normal_(param, std=0.5)
    return model.eval()


def tiny_mixtral_student(sub_norm: str = "none"):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(intermediate_size=512, num_local_experts=4,
                                             num_experts_per_tok=2, **SHAPE))
    convert_to_bitnet(_spread_routing(model), MIXTRAL, sub_norm)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return train_synthetic_tokenizer(512)


@pytest.fixture(scope="module")
def student():
    return tiny_mixtral_student()


@pytest.fixture(scope="module", params=TYPES)
def exported(request, tmp_path_factory, student, tokenizer):
    """(model, target, written, path) of the Mixtral student per ternary type."""
    target, problems = plan_gguf_export(student, MIXTRAL, "none", 1.0, request.param)
    assert problems == []
    path = tmp_path_factory.mktemp("moe") / f"m-{request.param}.gguf"
    return student, target, write_gguf(student, tokenizer, MIXTRAL, target, path), path


def test_mixtral_export_reads_back_exactly_with_expert_tensors(exported):
    model, target, written, path = exported
    assert target == GgufTarget("llama", target.export_type)
    assert check_gguf_tensors(path, model, target, written) == []
    layout = read_gguf_layout(path)
    assert layout.metadata["llama.expert_count"] == 4
    assert layout.metadata["llama.expert_used_count"] == 2
    shapes = {t.name: (t.shape, t.type_id) for t in layout.tensors}
    assert shapes["blk.1.ffn_gate_inp.weight"] == ((4, 256), F32)
    assert shapes["blk.1.ffn_gate_exps.weight"][0] == (4, 512, 256)
    assert shapes["blk.1.ffn_up_exps.weight"][0] == (4, 512, 256)
    assert shapes["blk.1.ffn_down_exps.weight"][0] == (4, 256, 512)
    assert not any(n.endswith((".scale", "ffn_gate.weight", "ffn_down.weight")) for n in shapes)


def test_each_expert_blocks_carry_that_experts_own_delta(tmp_path, student, tokenizer):
    target, _ = plan_gguf_export(student, MIXTRAL, "none", 1.0, "q2_0")
    path = tmp_path / "m.gguf"
    write_gguf(student, tokenizer, MIXTRAL, target, path)
    entry = read_gguf_layout(path).tensor("blk.0.ffn_down_exps.weight")
    codes, deltas = expert_codes(student.model.layers[0].mlp.experts, "down")
    raw = np.fromfile(path, dtype=np.uint8)[entry.offset:entry.offset + codes.size // 64 * 18]
    values, d = reference_unpack_q2_0(raw, codes.size)
    assert np.array_equal(values, codes.reshape(-1))
    assert len(set(deltas.tolist())) == 4  # four experts, four deltas
    per_expert = d.reshape(4, -1)
    assert (per_expert == np.float16(deltas)[:, None].astype(np.float32)).all()


def test_a_corrupted_expert_block_is_caught(tmp_path, student, tokenizer):
    target, _ = plan_gguf_export(student, MIXTRAL, "none", 1.0, "q2_0")
    path = tmp_path / "m.gguf"
    written = write_gguf(student, tokenizer, MIXTRAL, target, path)
    entry = read_gguf_layout(path).tensor("blk.1.ffn_up_exps.weight")
    data = bytearray(path.read_bytes())
    data[entry.offset + 3 * (512 * 256 // 64 * 18)] ^= 0x01  # expert 3's first fp16 d
    path.write_bytes(bytes(data))
    problems = check_gguf_tensors(path, student, target, written)
    assert problems and all(p.startswith("blk.1.ffn_up_exps.weight") for p in problems)


def test_llamacpp_runs_the_mixtral_export_like_pytorch(exported, tokenizer):
    require_llamacpp()
    model, target, _, path = exported
    stats = compare_with_llamacpp(path, model, tokenizer, target.export_type, prompts=PROMPTS)
    assert stats["problems"] == []
    assert stats["rel_rms"] < 5e-2 and stats["top1"] >= 0.98  # as for dense ternary files


def test_export_command_writes_and_checks_a_mixtral_student(tmp_path, student, tokenizer):
    source = tmp_path / "student"
    save_model_dir(student, tokenizer, source, TernaryMetadata("mixtral", "none", None))
    result = run_export(source, "tq2_0", tmp_path / "moe.gguf", True, "moe")
    assert result.problems == [] and result.path.exists()
    assert result.ternary == 2 * (4 + 3)  # per layer: Q, K, V, O and three expert tensors


def test_a_mixtral_student_with_sub_norms_is_refused():
    target, problems = plan_gguf_export(tiny_mixtral_student("paper"), MIXTRAL, "paper", 1.0,
                                        "tq2_0")
    assert target.arch == "bitnet"
    [moe] = [p for p in problems if "mixture-of-experts" in p.reason]
    assert "bitnet graph" in moe.reason and "no MoE FFN" in moe.reason
    assert "convert.sub_norm=none" in moe.fix and "wft serve --backend torch" in moe.fix


def test_i2_s_is_refused_for_routed_experts(student):
    _, problems = plan_gguf_export(student, MIXTRAL, "none", 1.0, "i2_s")
    [moe] = problems
    assert "needs one per expert" in moe.reason and "q2_0" in moe.fix


@pytest.mark.parametrize("model_type,reason", [("qwen3_moe", "`qwen3moe`"),
                                               ("qwen2_moe", "`qwen2moe`")])
def test_qwen_moe_students_are_refused(model_type, reason):
    from transformers import AutoConfig, AutoModelForCausalLM

    family = FAMILIES[model_type]
    config = AutoConfig.for_model(
        model_type, intermediate_size=512, moe_intermediate_size=256, num_experts=4,
        shared_expert_intermediate_size=256, head_dim=64, **SHAPE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    convert_to_bitnet(model, family, "none")
    _, problems = plan_gguf_export(model, family, "none", 1.0, "tq2_0")
    [moe] = [p for p in problems if reason in p.reason]
    assert "wft serve --backend torch" in moe.fix
