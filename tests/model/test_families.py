from types import SimpleNamespace

import pytest

from tests.conftest import tiny_llama, tiny_qwen3
from wftool.model.families import FAMILIES, bitnet_gguf_blockers, family_for_model_type
from wftool.model.surgery import bitlinear_layers, convert_to_bitnet


def _config(**kw):
    base = dict(tie_word_embeddings=True, hidden_act="silu", hidden_size=256,
                intermediate_size=768, num_attention_heads=4, head_dim=64)
    base.update(kw)
    return SimpleNamespace(**base)


def test_llama_paper_shape_fits_bitnet():
    assert bitnet_gguf_blockers(FAMILIES["llama"], _config(), "paper") == []


@pytest.mark.parametrize(
    "family,config,sub_norm,needle",
    [
        ("qwen3", _config(), "paper", "QK-norm"),
        ("qwen2", _config(), "paper", "biases"),
        ("llama", _config(tie_word_embeddings=False), "paper", "not tied"),
        ("llama", _config(), "all", "placement 'all'"),
        ("llama", _config(hidden_size=576, head_dim=144), "paper", "hidden_size 576"),
        ("llama", _config(hidden_act="relu2"), "paper", "SiLU"),
    ],
)
def test_bitnet_blockers_say_why(family, config, sub_norm, needle):
    reasons = bitnet_gguf_blockers(FAMILIES[family], config, sub_norm)
    assert any(needle in r for r in reasons), reasons


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
