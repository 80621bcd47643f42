"""Self-speculative decoding: a unified student's diffusion head drafts, its AR head verifies.

Each round starts from the last decided token t, which is not cached yet. One denoising
forward over [t, mask x (block_size - 1)] drafts the masks (argmax everywhere) and is
cropped back out. One causal forward over [t, drafts] against the exact KV cache then gives
the AR head's own choice at every draft position: the longest prefix of drafts that equals
those choices is accepted, the AR head's next token after it is appended (the next round's
t), and the rejected drafts are cropped from the cache. So greedy output is greedy
autoregressive decoding token for token, in fewer forwards when drafts are right.

Sampled (temperature > 0), a draft token d is accepted with probability p(d) under the AR
head's sampling distribution p, and on rejection the token is drawn from p without d:
speculative sampling for a deterministic draft, whose output is distributed as p.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from wftool.decoding.kv_cache import CachedSequence, checked_block_size
from wftool.decoding.sampling import (GREEDY, Sampling, sample_token, seeded_generator,
                                      token_distribution, without_token)
from wftool.decoding.stats import DecodeStats, emit_tokens
from wftool.model.mask_token import DiffusionSettings


def speculative_generate(model, prompt_ids: list[int], settings: DiffusionSettings,
                         max_new_tokens: int, *, block_size: int | None = None,
                         sampling: Sampling = GREEDY, stop_ids: Iterable[int] = (),
                         stats: DecodeStats | None = None) -> Iterator[int]:
    """Tokens after `prompt_ids` as autoregressive decoding would give them, drafted
    `block_size - 1` at a time (default: the student's block size) and verified; up to and
    including the first of `stop_ids`, at most `max_new_tokens`. The mask token is never
    produced. Block size 1 is plain autoregressive decoding (no drafts)."""
    block_size = checked_block_size(model, settings, block_size, "speculative")
    stats = stats if stats is not None else DecodeStats()
    rounds = _verified_rounds(model, list(prompt_ids), settings, max_new_tokens, block_size,
                              sampling, stats)
    return emit_tokens(rounds, max_new_tokens, stop_ids, stats)


@torch.inference_mode()
def _verified_rounds(model, prompt_ids: list[int], settings: DiffusionSettings,
                     max_new_tokens: int, block_size: int, sampling: Sampling,
                     stats: DecodeStats) -> Iterator[list[int]]:
    mask_id = settings.mask_token_id
    sequence = CachedSequence(model, stats)
    generator = seeded_generator(sampling, sequence.device)
    logits = without_token(sequence.prefill(prompt_ids), mask_id)
    token = sample_token(logits, sampling, generator)
    produced = 1
    yield [token]
    while produced < max_new_tokens:
        # Leave room for the token the AR head appends after the accepted drafts.
        room = min(block_size - 1, max_new_tokens - produced - 1)
        if settings.attention == "block":  # [token, drafts] within one training block
            room = min(room, block_size - 1 - sequence.length % block_size)
        drafts = _draft(sequence, token, room, settings) if room > 0 else []
        checked = without_token(sequence.forward([token, *drafts]), mask_id)
        accepted, token = _accept(checked, drafts, sampling, generator)
        sequence.crop(sequence.length - (len(drafts) - accepted))
        stats.drafted += len(drafts)
        stats.accepted += accepted
        produced += accepted + 1
        yield [*drafts[:accepted], token]


def _draft(sequence: CachedSequence, token: int, count: int,
           settings: DiffusionSettings) -> list[int]:
    """`count` tokens after `token` from one denoising forward over [token, masks]."""
    block = [token] + [settings.mask_token_id] * count
    out = sequence.forward(block, attention=settings.attention, keep=False)
    # With the shift the logits at i predict position i + 1; without, position i itself.
    predictions = out[:count] if settings.shift else out[1:]
    return without_token(predictions, settings.mask_token_id).argmax(-1).tolist()


def _accept(checked: torch.Tensor, drafts: list[int], sampling: Sampling,
            generator) -> tuple[int, int]:
    """(drafts accepted, the AR head's token after them) from the verifying logits
    `checked` [len(drafts) + 1, V]: row j is the AR head's prediction for draft j's place."""
    if sampling.greedy:
        choices = checked.argmax(-1).tolist()
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == choices[accepted]:
            accepted += 1
        return accepted, choices[accepted]
    for position, proposal in enumerate(drafts):
        probs = token_distribution(checked[position], sampling)
        draw = torch.rand((), generator=generator, device=probs.device)
        if draw < probs[proposal]:
            continue
        probs[proposal] = 0.0  # the rest of p once the draft's point mass is taken out
        return position, int(torch.multinomial(probs, 1, generator=generator))
    return len(drafts), sample_token(checked[len(drafts)], sampling, generator)
