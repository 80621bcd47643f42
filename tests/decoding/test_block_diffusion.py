"""Block diffusion decoding: every mask filled, AR as its block-1 limit, and the KV cache
computing what a whole-sequence recomputation computes."""

import pytest
import torch

from tests.decoding.conftest import MASK, PROMPTS, settings
from wftool.decoding import (DecodeStats, Sampling, autoregressive_generate,
                             diffusion_generate)


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("attention", ["bidirectional", "causal", "block"])
@pytest.mark.parametrize("block_size", [3, 4])
def test_every_mask_is_filled_and_the_length_is_exact(model, shift, attention, block_size):
    stats = DecodeStats()
    tokens = list(diffusion_generate(model, PROMPTS[0], settings(shift=shift, attention=attention),
                                     10, block_size=block_size, stats=stats))
    assert len(tokens) == 10 and MASK not in tokens  # the last block is a partial one
    assert stats.tokens == 10 and stats.prompt_tokens == len(PROMPTS[0])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_block_size_one_with_the_shift_is_greedy_autoregressive_decoding(model, prompt):
    ar_stats, stats = DecodeStats(), DecodeStats()
    expected = list(autoregressive_generate(model, prompt, 12, mask_token_id=MASK,
                                            stats=ar_stats))
    got = list(diffusion_generate(model, prompt, settings(), 12, block_size=1, stats=stats))
    assert got == expected
    assert stats.forwards == ar_stats.forwards and stats.denoising_forwards == 0


def test_a_threshold_above_one_unmasks_one_token_per_forward(model):
    stats = DecodeStats()
    tokens = list(diffusion_generate(model, PROMPTS[0], settings(shift=False), 11,
                                     threshold=1.5, stats=stats))
    assert stats.denoising_forwards == len(tokens) == 11
    # With the shift, a block's first position needs no forward once it is the last mask.
    stats = DecodeStats()
    list(diffusion_generate(model, PROMPTS[0], settings(), 12, threshold=1.5, stats=stats))
    assert 12 - 3 <= stats.denoising_forwards <= 12
    assert stats.forwards == stats.denoising_forwards + 2  # two blocks kept before the last


def test_steps_per_block_finishes_each_block_in_that_many_forwards(model):
    stats = DecodeStats()
    tokens = list(diffusion_generate(model, PROMPTS[0], settings(shift=False, block_size=8),
                                     16, threshold=1.5, steps_per_block=3, stats=stats))
    assert len(tokens) == 16 and MASK not in tokens
    assert stats.denoising_forwards == 2 * 3


def test_a_low_threshold_unmasks_a_block_in_one_forward(model):
    stats = DecodeStats()
    list(diffusion_generate(model, PROMPTS[0], settings(shift=False), 12, threshold=0.0,
                            stats=stats))
    assert stats.denoising_forwards == 3 and stats.tokens_per_forward == 12 / 5


def _recomputed(model, prompt, settings, max_new_tokens, threshold):
    """The same decoding with no KV cache: each forward runs the whole sequence, under the
    mask the cached decoder implies (kept tokens causal; the block being denoised sees them
    all, and itself bidirectionally or causally)."""
    sequence, size_limit = list(prompt), settings.block_size
    with torch.no_grad():
        while len(sequence) - len(prompt) < max_new_tokens:
            start = len(sequence)
            size = min(size_limit, max_new_tokens - (start - len(prompt)))
            if settings.attention == "block":
                size = min(size, size_limit - start % size_limit)
            block = [MASK] * size
            while MASK in block:
                total = start + size
                allowed = torch.ones(total, total, dtype=torch.bool).tril()
                if settings.attention != "causal":
                    allowed[start:, start:] = True
                logits = model(input_ids=torch.tensor([sequence + block]),
                               attention_mask=allowed[None, None]).logits[0].float()
                rows = logits[start - 1:total - 1] if settings.shift else logits[start:]
                rows[:, MASK] = float("-inf")
                confidence, choice = rows.softmax(-1).max(-1)
                masked = [i for i in range(size) if block[i] == MASK]
                sure = [i for i in masked if confidence[i] >= threshold]
                for i in sure or [max(masked, key=lambda i: confidence[i])]:
                    block[i] = int(choice[i])
            sequence += block
    return sequence[len(prompt):]


@pytest.mark.parametrize("shift,attention,threshold", [
    (True, "bidirectional", 0.9), (True, "bidirectional", 0.5), (False, "bidirectional", 0.7),
    (True, "causal", 0.9), (False, "causal", 2.0), (True, "block", 0.6),
])
def test_the_kv_cache_computes_what_recomputing_the_sequence_does(model, shift, attention,
                                                                   threshold):
    chosen = settings(shift=shift, attention=attention)
    for prompt in PROMPTS[:2]:
        expected = _recomputed(model, prompt, chosen, 10, threshold)
        assert list(diffusion_generate(model, prompt, chosen, 10, threshold=threshold)) == expected


def test_a_stop_id_ends_generation_after_it(model):
    full = list(diffusion_generate(model, PROMPTS[0], settings(), 12))
    stop = next(t for k, t in enumerate(full) if 5 <= k and t not in full[:k])
    end = full.index(stop)
    stats = DecodeStats()
    got = list(diffusion_generate(model, PROMPTS[0], settings(), 12, stop_ids={stop},
                                  stats=stats))
    assert got == full[:end + 1] and stats.tokens == end + 1
    blocks_needed = end // 4 + 1
    assert stats.forwards <= blocks_needed * 4 + blocks_needed - 1  # no block after the stop


def test_seeded_sampling_repeats_and_never_gives_the_mask(model):
    sampling = Sampling(temperature=1.5, top_p=0.95, seed=11)
    first = list(diffusion_generate(model, PROMPTS[1], settings(), 16, sampling=sampling))
    again = list(diffusion_generate(model, PROMPTS[1], settings(), 16, sampling=sampling))
    assert first == again and len(first) == 16 and MASK not in first


def test_a_packed_ternary_student_decodes():
    from tests.decoding.conftest import tiny_unified_llama
    from wftool.model.families import FAMILIES
    from wftool.model.surgery import convert_to_bitnet
    from wftool.quant.ternary_linear import pack_ternary_layers

    student = tiny_unified_llama()
    convert_to_bitnet(student, FAMILIES["llama"])
    pack_ternary_layers(student)
    for shift in (True, False):
        tokens = list(diffusion_generate(student, PROMPTS[0], settings(shift=shift), 9))
        assert len(tokens) == 9 and MASK not in tokens
