from types import SimpleNamespace

import pytest

from wftool.model.families import FAMILIES, family_for_model_type, head_dim
from wftool.model.surgery import bitlinear_layers, convert_to_bitnet


def test_head_dim_is_the_configs_or_hidden_over_heads():
    assert head_dim(SimpleNamespace(head_dim=128, hidden_size=256, num_attention_heads=4)) == 128
    assert head_dim(SimpleNamespace(head_dim=None, hidden_size=256, num_attention_heads=4)) == 64
    assert head_dim(SimpleNamespace(hidden_size=576, num_attention_heads=9)) == 64


def test_llama_gguf_tensors_are_the_bitnet_ones_without_sub_norms():
    family = FAMILIES["llama"]
    bitnet = dict(family.gguf_layer_tensors("bitnet"))
    llama = dict(family.gguf_layer_tensors("llama"))
    assert set(bitnet) - set(llama) == {"self_attn.attn_sub_norm", "mlp.ffn_sub_norm"}
    assert all(bitnet[path] == name for path, name in llama.items())
    with pytest.raises(ValueError, match="qwen3"):
        family.gguf_layer_tensors("qwen3")


@pytest.mark.parametrize("name,needle", [("qwen2", "biases"), ("qwen3", "QK-norm")])
def test_families_that_fit_no_gguf_graph_say_why_and_what_to_do(name, needle):
    family = FAMILIES[name]
    assert needle in family.bitnet_gguf_blocker and needle in family.llama_gguf_blocker
    assert "wft serve --backend torch" in family.gguf_fix
    assert FAMILIES["llama"].bitnet_gguf_blocker is None


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_every_family_converts_a_tiny_model(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
    )
    model = AutoModelForCausalLM.from_config(config)
    family = family_for_model_type(model_type)
    convert_to_bitnet(model, family)
    assert len(bitlinear_layers(model)) == 7
    layer = model.get_submodule(family.layers)[0]
    for slot in family.sub_norms:
        assert hasattr(layer.get_submodule(slot.parent), slot.name)
