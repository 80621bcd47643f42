"""Which architecture a student goes to, and why one cannot go anywhere exactly."""

import numpy as np
import pytest

from tests.conftest import tiny_llama, tiny_qwen3
from wftool.export.gguf_target import GgufTarget, plan_gguf_export
from wftool.model.families import FAMILIES
from wftool.model.surgery import convert_to_bitnet

LLAMA = FAMILIES["llama"]


def _plan(sub_norm="paper", export_type="tq2_0", quant_mix=1.0, family=LLAMA, model=None,
          sub_norm_eps=None, **config):
    if model is None:
        values = {"hidden_size": 256, "intermediate_size": 512}
        values.update(config)
        model = tiny_llama(**values)
    convert_to_bitnet(model, family, sub_norm, sub_norm_eps)
    return plan_gguf_export(model, family, sub_norm, quant_mix, export_type)


def _reasons(plan) -> list[str]:
    return [blocker.reason for blocker in plan[1]]


@pytest.mark.parametrize("sub_norm,arch", [("paper", "bitnet"), ("none", "llama")])
def test_the_sub_norm_placement_picks_the_architecture(sub_norm, arch):
    target, problems = _plan(sub_norm)
    assert problems == [] and target == GgufTarget(arch, "tq2_0")


def test_per_projection_norms_fit_no_architecture():
    target, problems = _plan("all")
    assert target is None
    [blocker] = [b for b in problems if "placement 'all'" in b.reason]
    assert "llama needs 'none'" in blocker.reason and "convert.sub_norm=paper" in blocker.fix


def test_untied_head_is_refused_for_bitnet_and_written_for_llama():
    _, problems = _plan("paper", tie_word_embeddings=False)
    [blocker] = [b for b in problems if "not tied" in b.reason]
    assert "convert.sub_norm=none" in blocker.fix
    target, problems = _plan("none", tie_word_embeddings=False)
    assert problems == [] and target.arch == "llama"


@pytest.mark.parametrize("sub_norm", ["paper", "none"])
def test_qwen3_qk_norm_is_refused_with_the_way_out(sub_norm):
    _, problems = _plan(sub_norm, export_type="f16", family=FAMILIES["qwen3"],
                        model=tiny_qwen3(tie_word_embeddings=True))
    assert any("QK-norm" in b.reason and "wft serve --backend torch" in b.fix for b in problems)


def test_qwen2_biases_and_a_squared_relu_are_refused():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen2 = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, tie_word_embeddings=True))
    assert any("biases" in r for r in _reasons(_plan(family=FAMILIES["qwen2"], model=qwen2)))
    assert any("hard-codes SiLU" in r for r in _reasons(_plan(hidden_act="relu2")))


def test_row_lengths_are_checked_per_type_and_name_the_tensor():
    narrow = {"hidden_size": 64, "intermediate_size": 128}  # half an I2_S group, no TQ block
    _, problems = _plan(**narrow)
    shape = "self_attn.q_proj.weight (64, 64): rows of 64 are not a multiple of 256"
    [rows] = [b for b in problems if shape in b.reason]
    assert "--type f16" in rows.fix and "i2_s" not in rows.fix  # 64 is half an I2_S group
    assert _plan(export_type="f16", **narrow)[1] == []
    odd = {"hidden_size": 96, "intermediate_size": 192, "num_attention_heads": 2}
    _, problems = _plan(export_type="i2_s", **odd)
    assert any("q_proj.weight (96, 96): rows of 96 are not a multiple of 128 (I2_S)" in b.reason
               for b in problems)
    wide = {"hidden_size": 384, "intermediate_size": 768, "num_attention_heads": 3}
    [rows] = _plan(**wide)[1]  # 384 = 3 I2_S groups, 1.5 TQ blocks
    assert "--type f16 or bf16" in rows.fix and "i2_s" in rows.fix
    assert _plan(export_type="i2_s", **narrow)[1] != []  # 64 is half a group
    assert _plan(export_type="i2_s")[1] == []


def test_unfinished_warm_up_rope_scaling_and_biases_are_refused():
    [warm_up] = _plan(quant_mix=0.5)[1]
    assert "warm-up is unfinished" in warm_up.reason
    assert "quantization.warmup_steps" in warm_up.fix
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    assert any("RoPE scaling 'llama3'" in r for r in _reasons(_plan("none", rope_scaling=rope)))
    assert any("has a bias" in r for r in _reasons(_plan("none", attention_bias=True)))


def test_the_smollm2_135m_width_is_refused_for_tq_types_only():
    smollm2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
               "num_key_value_heads": 3}
    [rows] = _plan(**smollm2)[1]
    assert "rows of 576 are not a multiple of 256" in rows.reason
    assert "or q2_0 (rows of 64" in rows.fix  # 576 and 1536 are whole Q2_0 blocks
    assert _plan(export_type="q2_0", **smollm2)[1] == []
    assert _plan(export_type="f16", **smollm2)[1] == []  # what its recipe exports


def test_sub_norm_eps_other_than_rms_norm_eps_is_refused_for_bitnet():
    # llama.cpp's bitnet graph normalises the sub-norms with layer_norm_rms_epsilon too.
    [blocker] = _plan(sub_norm_eps=1e-8, rms_norm_eps=1e-6)[1]
    assert "eps 1e-08" in blocker.reason and "rms_norm_eps is 1e-06" in blocker.reason
    assert "convert.sub_norm_eps unset" in blocker.fix
    assert _plan(sub_norm_eps=1e-6, rms_norm_eps=1e-6)[1] == []
    assert _plan(rms_norm_eps=1e-5)[1] == []  # unset: the sub-norms take rms_norm_eps


def test_where_the_delta_lives_and_who_loads_the_file():
    assert GgufTarget("bitnet", "tq2_0").scale_tensors
    assert not GgufTarget("bitnet", "i2_s").scale_tensors  # the I2_S tail holds it
    assert not GgufTarget("llama", "tq2_0").scale_tensors
    assert GgufTarget("llama", "i2_s").runtime == GgufTarget("bitnet", "i2_s").runtime == (
        "BitNet.cpp")
    assert GgufTarget("llama", "f16").runtime == "llama.cpp"
    delta = 0.0123456789
    assert GgufTarget("bitnet", "f16").stored_delta(delta) == pytest.approx(delta, rel=1e-7)
    assert GgufTarget("llama", "tq1_0").stored_delta(delta) == float(np.float16(delta))
    # Q2_0 keeps the delta as TQ does: an F32 .scale for bitnet, the fp16 block d for llama.
    assert GgufTarget("bitnet", "q2_0").scale_tensors
    assert GgufTarget("llama", "q2_0").stored_delta(delta) == float(np.float16(delta))
    assert GgufTarget("llama", "q2_0").runtime == "llama.cpp"
