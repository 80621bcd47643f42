"""Which architecture a student goes to, and why one cannot go anywhere exactly."""

import numpy as np
import pytest

from tests.conftest import tiny_llama, tiny_qwen3
from wftool.export.gguf_target import GgufTarget, plan_gguf_export
from wftool.model.families import FAMILIES
from wftool.model.surgery import convert_to_bitnet

LLAMA = FAMILIES["llama"]


def _plan(sub_norm="paper", export_type="tq2_0", quant_mix=1.0, family=LLAMA, model=None,
          **config):
    if model is None:
        values = {"hidden_size": 256, "intermediate_size": 512}
        values.update(config)
        model = tiny_llama(**values)
    convert_to_bitnet(model, family, sub_norm)
    return plan_gguf_export(model, family, sub_norm, quant_mix, export_type)


@pytest.mark.parametrize("sub_norm,arch", [("paper", "bitnet"), ("none", "llama")])
def test_the_sub_norm_placement_picks_the_architecture(sub_norm, arch):
    target, problems = _plan(sub_norm)
    assert problems == [] and target == GgufTarget(arch, "tq2_0")


def test_per_projection_norms_fit_no_architecture():
    target, problems = _plan("all")
    assert target is None
    assert any("placement 'all'" in p and "llama needs 'none'" in p for p in problems)


def test_untied_head_is_refused_for_bitnet_and_written_for_llama():
    _, problems = _plan("paper", tie_word_embeddings=False)
    assert any("not tied" in p for p in problems)
    target, problems = _plan("none", tie_word_embeddings=False)
    assert problems == [] and target.arch == "llama"


@pytest.mark.parametrize("sub_norm", ["paper", "none"])
def test_qwen3_qk_norm_is_refused_with_the_way_out(sub_norm):
    _, problems = _plan(sub_norm, export_type="f16", family=FAMILIES["qwen3"],
                        model=tiny_qwen3(tie_word_embeddings=True))
    assert any("QK-norm" in p and "wft serve --backend torch" in p for p in problems)


def test_row_lengths_are_checked_per_type_and_name_the_tensor():
    narrow = {"hidden_size": 64, "intermediate_size": 128}  # half an I2_S group, no TQ block
    _, problems = _plan(**narrow)
    assert any("self_attn.q_proj.weight (64, 64): rows of 64 are not a multiple of 256" in p
               for p in problems)
    assert _plan(export_type="f16", **narrow)[1] == []
    odd = {"hidden_size": 96, "intermediate_size": 192, "num_attention_heads": 2}
    _, problems = _plan(export_type="i2_s", **odd)
    assert any("q_proj.weight (96, 96): rows of 96 are not a multiple of 128 (I2_S)" in p
               for p in problems)
    assert _plan(export_type="i2_s", **narrow)[1] != []  # 64 is half a group
    assert _plan(export_type="i2_s")[1] == []


def test_unfinished_warm_up_rope_scaling_and_biases_are_refused():
    assert any("warm-up is unfinished" in p for p in _plan(quant_mix=0.5)[1])
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    assert any("RoPE scaling 'llama3'" in p for p in _plan("none", rope_scaling=rope)[1])
    _, problems = _plan("none", attention_bias=True)
    assert any("has a bias" in p for p in problems)


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
