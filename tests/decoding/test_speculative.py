"""Self-speculative decoding: greedy output is greedy AR decoding token for token, and a
student whose heads agree accepts whole drafts."""

import pytest
import torch

from tests.decoding.conftest import MASK, PROMPTS, settings
from wftool.decoding import (DecodeStats, Sampling, autoregressive_generate,
                             speculative_generate)
from wftool.decoding.speculative import _accept


@pytest.mark.parametrize("block_size", [1, 2, 4])
@pytest.mark.parametrize("shift,attention", [(True, "bidirectional"), (False, "causal")])
def test_greedy_speculative_decoding_is_greedy_autoregressive(model, block_size, shift,
                                                              attention):
    chosen = settings(shift=shift, attention=attention)
    for prompt in PROMPTS:
        expected = list(autoregressive_generate(model, prompt, 14, mask_token_id=MASK))
        stats = DecodeStats()
        got = list(speculative_generate(model, prompt, chosen, 14, block_size=block_size,
                                        stats=stats))
        assert got == expected
        assert stats.tokens == 14 and stats.accepted <= stats.drafted
        if block_size == 1:  # nothing to draft: one forward per token, as AR
            assert stats.drafted == 0 and stats.forwards == 13


def test_a_student_whose_heads_agree_accepts_whole_drafts(self_consistent_model):
    for prompt in ([3] * 5, [5, 5], [11]):
        expected = list(autoregressive_generate(self_consistent_model, prompt, 13,
                                                mask_token_id=MASK))
        stats = DecodeStats()
        got = list(speculative_generate(self_consistent_model, prompt, settings(), 13,
                                        block_size=4, stats=stats))
        assert got == expected
        verifying = stats.forwards - stats.denoising_forwards
        # 1 token from the prefill, then 3 accepted drafts + the AR head's own per verify.
        assert stats.accepted == stats.drafted == 9 and verifying == 3
        assert (stats.tokens - 1) / verifying == 4


def test_a_stop_id_inside_accepted_drafts_ends_generation(self_consistent_model):
    stats = DecodeStats()
    got = list(speculative_generate(self_consistent_model, [3] * 5, settings(), 13,
                                    block_size=4, stop_ids={3}, stats=stats))
    assert got == [3] and stats.forwards == 0  # the first token came from the prefill


def test_max_tokens_is_exact_whatever_the_block(model):
    for limit in (1, 2, 5):
        assert len(list(speculative_generate(model, PROMPTS[0], settings(), limit,
                                             block_size=4))) == limit


def test_sampled_verification_keeps_the_ar_distribution():
    """A draft token d is accepted with probability p(d), else the token is drawn from p
    without d: the first token out is distributed as p, whatever was drafted."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]))
    sampling = Sampling(temperature=1.0, seed=0)
    generator = torch.Generator().manual_seed(0)
    for draft in (0, 2):
        counts = torch.zeros(4)
        for _ in range(4000):
            accepted, token = _accept(logits, [draft], sampling, generator)
            counts[draft if accepted else token] += 1
        assert torch.allclose(counts / 4000, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)


def test_seeded_sampling_repeats_and_never_gives_the_mask(model):
    sampling = Sampling(temperature=1.0, seed=5)
    first = list(speculative_generate(model, PROMPTS[2], settings(), 16, sampling=sampling))
    assert first == list(speculative_generate(model, PROMPTS[2], settings(), 16,
                                              sampling=sampling))
    assert len(first) == 16 and MASK not in first
