"""Autoregressive decoding from the KV cache, and the limits every mode shares."""

import pytest
import torch

from tests.decoding.conftest import MASK, PROMPTS, settings
from wftool.decoding import (DecodeStats, autoregressive_generate, diffusion_generate,
                             speculative_generate)


def test_cached_greedy_decoding_is_the_argmax_of_full_forwards(model):
    for prompt in PROMPTS:
        expected = []
        with torch.no_grad():
            for _ in range(10):
                logits = model(input_ids=torch.tensor([prompt + expected])).logits[0, -1]
                logits[MASK] = float("-inf")
                expected.append(int(logits.argmax()))
        assert list(autoregressive_generate(model, prompt, 10, mask_token_id=MASK)) == expected


def test_stats_count_the_forwards_after_the_prefill(model):
    stats = DecodeStats()
    tokens = list(autoregressive_generate(model, PROMPTS[0], 8, stats=stats))
    # The prefill gives the first token; the last one needs no forward after it.
    assert (stats.prompt_tokens, stats.tokens, stats.forwards) == (5, 8, 7)
    assert stats.denoising_forwards == 0 and stats.seconds > 0 and len(tokens) == 8
    list(autoregressive_generate(model, PROMPTS[1], 4, stats=stats))
    assert (stats.prompt_tokens, stats.tokens, stats.forwards) == (6, 12, 10)  # sums


def test_zero_tokens_runs_nothing(model):
    stats = DecodeStats()
    assert list(autoregressive_generate(model, PROMPTS[0], 0, stats=stats)) == []
    assert list(diffusion_generate(model, PROMPTS[0], settings(), 0, stats=stats)) == []
    assert list(speculative_generate(model, PROMPTS[0], settings(), 0, stats=stats)) == []
    assert stats.prompt_tokens == 0


@pytest.fixture
def mask_loving_model(model):
    """The model with the mask token's logit raised far above every other."""
    def raise_mask(_module, _inputs, logits):
        bonus = torch.zeros(logits.shape[-1])
        bonus[MASK] = 1e4
        return logits + bonus

    handle = model.lm_head.register_forward_hook(raise_mask)
    yield model
    handle.remove()


def test_the_mask_token_is_never_produced(mask_loving_model):
    model = mask_loving_model
    with torch.no_grad():
        assert int(model(input_ids=torch.tensor([PROMPTS[0]])).logits[0, -1].argmax()) == MASK
    for tokens in (autoregressive_generate(model, PROMPTS[0], 6, mask_token_id=MASK),
                   diffusion_generate(model, PROMPTS[0], settings(), 6),
                   speculative_generate(model, PROMPTS[0], settings(), 6)):
        tokens = list(tokens)
        assert len(tokens) == 6 and MASK not in tokens
