import pytest

from tests.conftest import tiny_llama, tiny_qwen3
from wftool.model.checkpoint import TernaryMetadata, save_model_dir
from wftool.model.families import FAMILIES
from wftool.model.surgery import convert_to_bitnet
from wftool.model.tokenizer import train_synthetic_tokenizer

# Greedy picks are compared across computations that round differently (a KV cache or not,
# packed integer or float BitLinear matmuls: logits move by ~1e-6, and int8 activation codes
# can flip and move them further), so only up to the first step whose top two logits are
# closer than this.
DECISIVE = 0.05


@pytest.fixture(scope="session")
def tokenizer():
    return train_synthetic_tokenizer(512)


@pytest.fixture(scope="session")
def qwen3_student(tmp_path_factory, tokenizer):
    """A saved Qwen3 student (QK-norm, untied head: no llama.cpp architecture holds it)."""
    # A wide init makes greedy choices decisive, so backends can be compared token by token.
    model = tiny_qwen3(vocab_size=512, max_position_embeddings=256, initializer_range=0.5)
    convert_to_bitnet(model, FAMILIES["qwen3"])
    path = tmp_path_factory.mktemp("qwen3") / "student"
    save_model_dir(model, tokenizer, path, TernaryMetadata("qwen3", "paper", None))
    return path, model


@pytest.fixture(scope="session")
def llama_student(tokenizer):
    """A Llama student whose widths fit TQ types (rows multiples of 256)."""
    model = tiny_llama(vocab_size=512, hidden_size=256, intermediate_size=512,
                       max_position_embeddings=256)
    convert_to_bitnet(model, FAMILIES["llama"])
    return model
