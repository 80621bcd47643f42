"""Block diffusion decoding (Fast-dLLM style): blocks of mask tokens unmasked by confidence.

The prompt is prefilled once. Each block starts as mask tokens at the next positions; a
denoising forward runs only the block against the cache (bidirectional within it, or causal
for a student trained causally) and is cropped back out. The positions whose chosen token
has probability >= `threshold` are unmasked (always the most confident one; more when
`steps_per_block` needs them to finish in time) and the next forward sees them. A finished
block is kept with one causal forward, so the cache holds what autoregressive decoding's
would; with the shift that forward also predicts the next block's first position.

With `shift` (AR-to-diffusion adaptation) the logits at position i-1 predict position i: a
block's first position is predicted by the last kept token, needs no denoising forward, and
block size 1 is greedy autoregressive decoding. Without it each position predicts itself.
Students trained block-causally (`attention: block`) decode in blocks aligned as in
training, on multiples of the block size counted from position 0.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch

from wftool.decoding.kv_cache import CachedSequence, checked_block_size
from wftool.decoding.sampling import (GREEDY, Sampling, choose_tokens, seeded_generator,
                                      without_token)
from wftool.decoding.stats import DecodeStats, emit_tokens
from wftool.model.mask_token import DiffusionSettings


def diffusion_generate(model, prompt_ids: list[int], settings: DiffusionSettings,
                       max_new_tokens: int, *, block_size: int | None = None,
                       threshold: float = 0.9, steps_per_block: int | None = None,
                       sampling: Sampling = GREEDY, stop_ids: Iterable[int] = (),
                       stats: DecodeStats | None = None) -> Iterator[int]:
    """Tokens after `prompt_ids`, denoised a block at a time and yielded as each block
    finishes, up to and including the first of `stop_ids`, at most `max_new_tokens`.

    `block_size`: tokens per block (default: the student's). `threshold`: unmask every
    position at least this confident (above 1: one token per forward). `steps_per_block`:
    unmask enough per forward to finish a block in that many. Greedy unless `sampling`
    says otherwise; the mask token is never produced.
    """
    block_size = checked_block_size(model, settings, block_size, "diffusion")
    if steps_per_block is not None and steps_per_block < 1:
        raise ValueError(f"steps_per_block must be at least 1, got {steps_per_block}")
    stats = stats if stats is not None else DecodeStats()
    blocks = _denoised_blocks(model, list(prompt_ids), settings, max_new_tokens, block_size,
                              threshold, steps_per_block, sampling, stats)
    return emit_tokens(blocks, max_new_tokens, stop_ids, stats)


@torch.inference_mode()
def _denoised_blocks(model, prompt_ids: list[int], settings: DiffusionSettings,
                     max_new_tokens: int, block_size: int, threshold: float,
                     steps_per_block: int | None, sampling: Sampling, stats: DecodeStats
                     ) -> Iterator[list[int]]:
    sequence = CachedSequence(model, stats)
    generator = seeded_generator(sampling, sequence.device)
    next_logits = sequence.prefill(prompt_ids)  # predicts the first new position
    produced = 0
    while produced < max_new_tokens:
        size = min(block_size, max_new_tokens - produced)
        if settings.attention == "block":  # end where a training block ends
            size = min(size, block_size - sequence.length % block_size)
        block = _denoise(sequence, next_logits, size, settings, threshold, steps_per_block,
                         sampling, generator)
        produced += size
        yield block
        if produced < max_new_tokens:  # the consumer wants more: keep the block
            next_logits = sequence.forward(block)[-1]


def _denoise(sequence: CachedSequence, next_logits: torch.Tensor, size: int,
             settings: DiffusionSettings, threshold: float, steps_per_block: int | None,
             sampling: Sampling, generator) -> list[int]:
    """One block of `size` positions after the cached sequence, from all-mask to tokens."""
    mask_id = settings.mask_token_id
    tokens = [mask_id] * size
    masked = torch.ones(size, dtype=torch.bool)
    steps_left = steps_per_block
    logits = next_logits[None] if settings.shift else None
    while masked.any():
        # With the shift, position 0 is predicted by the kept sequence: once it is the only
        # mask left, the last logits still hold.
        if not settings.shift or masked[1:].any():
            out = sequence.forward(tokens, attention=settings.attention, keep=False)
            logits = torch.cat([next_logits[None], out[:-1]]) if settings.shift else out
        choice, confidence = choose_tokens(without_token(logits, mask_id), sampling, generator)
        confidence = confidence.cpu().masked_fill(~masked, -1.0)
        count = _unmask_count(confidence, masked, threshold, steps_left)
        choice = choice.tolist()
        for position in confidence.topk(count).indices.tolist():
            tokens[position] = choice[position]
            masked[position] = False
        if steps_left is not None:
            steps_left = max(steps_left - 1, 1)
    return tokens


def _unmask_count(confidence: torch.Tensor, masked: torch.Tensor, threshold: float,
                  steps_left: int | None) -> int:
    """How many masked positions to unmask now: all at least `threshold` confident, at
    least one, and at least an even share of the rest over the steps left."""
    remaining = int(masked.sum())
    sure = int(((confidence >= threshold) & masked).sum())
    scheduled = math.ceil(remaining / steps_left) if steps_left else 1
    return min(remaining, max(sure, scheduled, 1))
