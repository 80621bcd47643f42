"""The 4D masks of look-ahead blocks and the models that can take them."""

import pytest
import torch

from tests.decoding.conftest import PROMPTS, settings, tiny_unified_llama
from wftool.decoding import diffusion_generate, speculative_generate
from wftool.decoding.kv_cache import block_attention_mask, lookahead_problem
from wftool.errors import WftError


def test_a_block_sees_the_cache_and_itself(model):
    mask = block_attention_mask(3, 2, True, model)
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 2, 5)  # True = attend (sdpa)
    assert mask.all()
    causal = block_attention_mask(3, 2, False, model)[0, 0]
    assert causal.tolist() == [[True] * 4 + [False], [True] * 5]


def test_eager_attention_gets_an_additive_mask_and_decodes_as_sdpa(model):
    eager = tiny_unified_llama()
    eager.load_state_dict(model.state_dict())
    eager.config._attn_implementation = "eager"
    additive = block_attention_mask(1, 2, False, eager)[0, 0]
    assert additive.dtype == torch.float32 and additive[0, 2] == torch.finfo(torch.float32).min
    assert additive[0, :2].eq(0).all()
    for decoder in (diffusion_generate, speculative_generate):
        assert list(decoder(eager, PROMPTS[0], settings(), 8)) == \
            list(decoder(model, PROMPTS[0], settings(), 8))


def test_models_that_cannot_look_ahead_are_refused_with_the_reason():
    model = tiny_unified_llama()
    model.config._attn_implementation = "flash_attention_2"
    assert "attn_implementation='sdpa'" in lookahead_problem(model, "bidirectional")
    assert lookahead_problem(model, "causal") is None  # transformers builds causal masks
    with pytest.raises(WftError, match="sdpa"):
        diffusion_generate(model, PROMPTS[0], settings(), 4)
    windowed = tiny_unified_llama(layer_types=["sliding_attention", "full_attention"],
                                  sliding_window=4)
    assert "sliding-window" in lookahead_problem(windowed, "causal")
