"""Surgery and the ternary model directory: forward sees delta x {-1,0,1}, reload is exact."""

import json

import pytest
import torch

from tests.conftest import tiny_llama, tiny_qwen3
from wftool.errors import WftError
from wftool.model.checkpoint import (
    TernaryMetadata,
    load_ternary_model,
    read_metadata,
    save_model_dir,
)
from wftool.model.families import family_for_model_type
from wftool.model.surgery import bitlinear_layers, convert_to_bitnet
from wftool.quant.bitlinear import BitLinear, RMSNorm
from wftool.quant.ternary import fake_quantize_activations, ternarize

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _convert(model, sub_norm="paper"):
    family = family_for_model_type(model.config.model_type)
    return convert_to_bitnet(model, family, sub_norm), family


def _capture_projection_io(model):
    seen = {}

    def hook(name):
        def record(module, args, output):
            seen[name] = (args[0].detach(), output.detach())

        return record

    handles = [
        m.register_forward_hook(hook(n)) for n, m in bitlinear_layers(model).items()
    ]
    return seen, handles


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen3], ids=["llama", "qwen3"])
def test_every_projection_is_ternary_in_forward(build):
    model = build()
    report, _ = _convert(model)
    layers = bitlinear_layers(model)
    assert {name.rsplit(".", 1)[1] for name in layers} == PROJECTIONS
    assert len(layers) == 7 * model.config.num_hidden_layers == len(report.quantized)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, BitLinear)
    seen, handles = _capture_projection_io(model)
    with torch.no_grad():
        model(torch.randint(0, 128, (2, 12)))
    for handle in handles:
        handle.remove()
    assert set(seen) == set(layers)
    for name, layer in layers.items():
        codes, delta = ternarize(layer.weight)
        assert set(codes.unique().tolist()) <= {-1, 0, 1}
        x, out = seen[name]
        if layer.input_norm is not None:
            x = layer.input_norm(x)
        expected = fake_quantize_activations(x) @ (codes.float() * delta).T
        if layer.bias is not None:
            expected = expected + layer.bias
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6, msg=name)


def test_paper_sub_norms_sit_before_o_proj_and_down_proj():
    model = tiny_llama()
    report, _ = _convert(model)
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.attn_sub_norm, RMSNorm)
    assert layer.self_attn.attn_sub_norm.weight.shape == (64,)
    assert layer.mlp.ffn_sub_norm.weight.shape == (128,)  # intermediate width
    assert layer.self_attn.o_proj.input_norm is layer.self_attn.attn_sub_norm
    assert layer.mlp.down_proj.input_norm is layer.mlp.ffn_sub_norm
    assert layer.self_attn.q_proj.input_norm is None
    keys = model.state_dict().keys()
    assert "model.layers.0.self_attn.attn_sub_norm.weight" in keys
    assert not any("o_proj.input_norm" in k for k in keys)
    assert len(report.sub_norms) == 2 * model.config.num_hidden_layers


def test_all_placement_puts_a_norm_before_every_projection():
    model = tiny_llama()
    report, _ = _convert(model, "all")
    assert all(layer.input_norm is not None for layer in bitlinear_layers(model).values())
    assert len(report.sub_norms) == 7 * model.config.num_hidden_layers
    assert model.model.layers[0].self_attn.q_proj.input_norm.eps == 1e-8


def test_converting_twice_is_refused():
    model = tiny_llama()
    _convert(model)
    with pytest.raises(ValueError, match="converted twice"):
        _convert(model)


@pytest.mark.parametrize(
    "build,sub_norm", [(tiny_llama, "paper"), (tiny_qwen3, "paper"), (tiny_llama, "all")]
)
def test_save_and_reload_gives_identical_logits(tmp_path, build, sub_norm):
    model = build()
    _, family = _convert(model, sub_norm)
    # Make the sub-norms non-trivial so a reload that skipped them would be caught.
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight.data.uniform_(0.5, 1.5)
    tokens = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        before = model(tokens).logits
    meta = TernaryMetadata(family.name, sub_norm, None, quant_mix=1.0)
    save_model_dir(model, None, tmp_path / "student", meta)
    reloaded, _, loaded_meta = load_ternary_model(tmp_path / "student")
    assert loaded_meta == meta
    with torch.no_grad():
        after = reloaded(tokens).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_reload_restores_warmup_mix(tmp_path):
    model = tiny_llama()
    _, family = _convert(model)
    save_model_dir(model, None, tmp_path / "m", TernaryMetadata("llama", "paper", None, 0.5))
    reloaded, _, meta = load_ternary_model(tmp_path / "m")
    assert meta.quant_mix == 0.5
    assert all(layer.warming_up for layer in bitlinear_layers(reloaded).values())


def test_missing_sub_norm_tensor_is_a_clear_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    _convert(model)
    path = save_model_dir(model, None, tmp_path / "m", TernaryMetadata("llama", "paper", None))
    tensors = load_file(path / "model.safetensors")
    tensors.pop("model.layers.1.mlp.ffn_sub_norm.weight")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WftError, match="ffn_sub_norm"):
        load_ternary_model(path)


def test_truncated_weights_are_a_clear_error(tmp_path):
    model = tiny_llama()
    _convert(model)
    path = save_model_dir(model, None, tmp_path / "m", TernaryMetadata("llama", "paper", None))
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(WftError, match="cannot (load|read)"):
        load_ternary_model(path)


def test_not_a_wft_directory(tmp_path):
    with pytest.raises(WftError, match="no config.json"):
        read_metadata(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(WftError, match="not a wft ternary model"):
        read_metadata(tmp_path)


def test_save_replaces_atomically_and_leaves_no_temp_dirs(tmp_path):
    model = tiny_llama()
    _convert(model)
    meta = TernaryMetadata("llama", "paper", None)
    save_model_dir(model, None, tmp_path / "m", meta)
    save_model_dir(model, None, tmp_path / "m", meta)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_unsupported_family_lists_supported_ones():
    with pytest.raises(WftError) as err:
        family_for_model_type("gpt2")
    assert "gpt2" in str(err.value)
    for name in ("llama", "qwen2", "qwen3", "mistral"):
        assert name in str(err.value)
