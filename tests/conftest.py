import importlib.util
import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def require_llamacpp():
    """Skip where llama-cpp-python is absent, except in CI (WFT_REQUIRE_LLAMACPP=1), where
    the llama.cpp tests must run for real."""
    if importlib.util.find_spec("llama_cpp") is not None:
        return
    if os.environ.get("WFT_REQUIRE_LLAMACPP") == "1":
        pytest.fail("llama-cpp-python is required here (WFT_REQUIRE_LLAMACPP=1) but missing")
    pytest.skip("llama-cpp-python is not installed")


def tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    values = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    values.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**values)).eval()


def tiny_llama_student(sub_norm: str, **overrides):
    """A converted Llama student whose widths every GGUF type holds (vocab 512 = the synthetic
    tokenizer's, hidden 256, FFN 512)."""
    from wftool.model.families import FAMILIES
    from wftool.model.surgery import convert_to_bitnet

    values = {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
              "num_attention_heads": 4, "num_key_value_heads": 2}
    values.update(overrides)
    model = tiny_llama(**values)
    convert_to_bitnet(model, FAMILIES["llama"], sub_norm)
    return model


def tiny_qwen3(**overrides):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    values = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(**values)).eval()


@pytest.fixture
def llama_model():
    return tiny_llama()


@pytest.fixture
def qwen3_model():
    return tiny_qwen3()
