"""Fake MoE from dense: a Llama/Mistral becomes a Mixtral that computes the same logits."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import wftool.commands.convert as convert_command
from tests.conftest import tiny_llama, tiny_qwen3
from wftool.cli import app
from wftool.errors import WftError
from wftool.model.moe_from_dense import check_moe_equals_dense, dense_to_moe
from wftool.model.surgery import ConversionReport
from wftool.recipe.load import load_recipe

runner = CliRunner()


def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=64, sliding_window=8)
    return MistralForCausalLM(config).eval()


DENSE_MODELS = {
    "llama-tied-gqa": tiny_llama,
    "llama-untied-mha": lambda: tiny_llama(tie_word_embeddings=False, num_key_value_heads=4),
    "mistral": tiny_mistral,
}
ROUTING = [(4, 2), (4, 1)]


@pytest.fixture(params=list(DENSE_MODELS), ids=list(DENSE_MODELS))
def dense(request):
    return DENSE_MODELS[request.param]()


@pytest.mark.parametrize("experts,top_k", ROUTING, ids=["4x-top2", "4x-top1"])
def test_moe_logits_equal_the_dense_models(dense, experts, top_k):
    moe = dense_to_moe(dense, experts, top_k)
    assert type(moe).__name__ == "MixtralForCausalLM"
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = dense(tokens).logits, moe(tokens).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    assert check_moe_equals_dense(dense, moe) < 1e-5


@pytest.mark.parametrize("experts,top_k", ROUTING, ids=["4x-top2", "4x-top1"])
def test_every_expert_copies_the_dense_ffn_and_the_router_is_random(dense, experts, top_k):
    moe = dense_to_moe(dense, experts, top_k)
    for dense_layer, moe_layer in zip(dense.model.layers, moe.model.layers, strict=True):
        mlp, block = dense_layer.mlp, moe_layer.mlp
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        for expert in range(experts):
            assert torch.equal(block.experts.gate_up_proj[expert], gate_up)
            assert torch.equal(block.experts.down_proj[expert], mlp.down_proj.weight)
        assert torch.count_nonzero(block.gate.weight) == block.gate.weight.numel()
        assert block.gate.weight.shape == (experts, dense.config.hidden_size)
    # Experts own their weights, so training one leaves the others as they were.
    experts_tensor = moe.model.layers[0].mlp.experts.gate_up_proj
    assert experts_tensor[0].data_ptr() != experts_tensor[1].data_ptr()


def test_config_and_non_ffn_weights_carry_over(dense):
    moe = dense_to_moe(dense, 4, 2)
    config = moe.config
    assert (config.num_local_experts, config.num_experts_per_tok) == (4, 2)
    assert config.router_jitter_noise == 0 and config.output_router_logits is False
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_key_value_heads",
                 "rms_norm_eps", "tie_word_embeddings", "rope_parameters"):
        assert getattr(config, name) == getattr(dense.config, name), name
    assert config.sliding_window == getattr(dense.config, "sliding_window", None)
    assert moe.dtype == dense.dtype and moe.device == dense.device
    tied = moe.lm_head.weight is moe.model.embed_tokens.weight
    assert tied == dense.config.tie_word_embeddings
    moe_state = moe.state_dict()
    for key, tensor in dense.state_dict().items():
        if ".mlp." not in key:
            assert torch.equal(moe_state[key], tensor), key
            assert moe_state[key].data_ptr() != tensor.data_ptr(), key  # copied, not shared
    assert not any(buffer.is_meta for buffer in moe.buffers())


def test_the_check_fails_once_an_expert_differs():
    dense = tiny_llama()
    moe = dense_to_moe(dense, 4, 2)
    with torch.no_grad():
        for experts in (layer.mlp.experts for layer in moe.model.layers):
            experts.down_proj.mul_(torch.arange(1, 5.0).view(4, 1, 1))  # experts now differ
    assert check_moe_equals_dense(dense, moe) > 1e-2


def test_converting_leaves_the_dense_model_as_it_was():
    dense = tiny_llama()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    dense_to_moe(dense, 4, 2)
    assert all(torch.equal(dense.state_dict()[k], v) for k, v in before.items())


def test_an_unmappable_family_is_refused_with_the_supported_ones():
    with pytest.raises(WftError) as err:
        dense_to_moe(tiny_qwen3(), 4, 2)
    message = str(err.value)
    assert "convert.moe" in message and "qwen3" in message
    assert "llama" in message and "mistral" in message


def test_a_model_that_already_is_an_moe_is_refused():
    moe = dense_to_moe(tiny_llama(), 4, 2)
    with pytest.raises(WftError, match="convert.moe.*already is a Mixture of Experts"):
        dense_to_moe(moe, 4, 2)


def test_projection_biases_are_refused():
    with pytest.raises(WftError, match="convert.moe.*attention_bias"):
        dense_to_moe(tiny_llama(attention_bias=True), 4, 2)


def test_recipe_refuses_top_k_above_experts():
    assert load_recipe("tiny", ["convert.moe.experts=8"]).convert.moe.top_k == 2
    with pytest.raises(WftError, match="convert.moe: top_k=3 is more than experts=2"):
        load_recipe("tiny", ["convert.moe.experts=2", "convert.moe.top_k=3"])


def test_convert_refuses_an_moe_whose_logits_differ(monkeypatch):
    monkeypatch.setattr(convert_command, "check_moe_equals_dense", lambda dense, moe: 0.3)
    stage = load_recipe("tiny", ["convert.moe.experts=4"]).convert.moe
    with pytest.raises(WftError, match="convert.moe: the 4-expert model's logits differ"):
        convert_command._dense_to_checked_moe(tiny_llama(), stage)


def test_convert_of_an_unmappable_family_exits_2(tmp_path):
    result = runner.invoke(app, ["convert", "tiny", "--output", str(tmp_path / "o"),
                                 "model.config.model_type=qwen3", "convert.moe.experts=4"])
    assert result.exit_code == 2, result.output
    assert "convert.moe" in result.output and "Traceback" not in result.output


def test_summary_shows_the_moe_check():
    recipe = load_recipe("tiny", ["convert.moe.experts=8"])
    result = convert_command.ConvertResult(Path("out"), ConversionReport(), "mixtral", "bitnet",
                                           recipe.export.type, [], None, 3e-7)
    console = Console(record=True, width=200)
    convert_command.print_convert_summary(result, recipe, console)
    assert ("8 experts, top-2, logits equal the dense model's (max rel diff 3e-7)"
            in console.export_text())


@pytest.mark.skipif(importlib.util.find_spec("wftool.quant.bit_experts") is None,
                    reason="ternary Mixtral experts (wftool.quant.bit_experts) not written yet")
def test_convert_tiny_as_moe_end_to_end(tmp_path):
    out = tmp_path / "student"
    result = runner.invoke(app, ["convert", "tiny", "--output", str(out),
                                 "convert.moe.experts=4", "convert.moe.top_k=2"])
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.replace("│", " ").split())
    assert "4 experts, top-2, logits equal the dense model's" in shown
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
    from wftool.model.checkpoint import load_model_dir
    from wftool.quant.bit_experts import BitExperts

    student, _, meta = load_model_dir(out)
    assert meta.family == "mixtral"
    assert all(isinstance(layer.mlp.experts, BitExperts) for layer in student.model.layers)


def test_random_routing_lets_the_experts_train_apart(dense):
    """Tokens go to different experts, so one backward step already gives the experts
    different gradients (a zero router would send every token to the same ones)."""
    moe = dense_to_moe(dense, 4, 2).train()
    ids = torch.randint(0, dense.config.vocab_size, (2, 16), generator=torch.Generator()
                        .manual_seed(0))
    moe(input_ids=ids, labels=ids).loss.backward()
    grads = moe.model.layers[0].mlp.experts.gate_up_proj.grad
    trained = [e for e in range(4) if grads[e].abs().sum() > 0]
    assert len(trained) > 2  # more experts than one token's top-2
    assert not torch.allclose(grads[trained[0]], grads[trained[1]])
