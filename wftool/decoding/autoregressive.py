"""Autoregressive decoding: one forward per token against the KV cache."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from wftool.decoding.kv_cache import CachedSequence
from wftool.decoding.sampling import (GREEDY, Sampling, sample_token, seeded_generator,
                                      without_token)
from wftool.decoding.stats import DecodeStats, emit_tokens


def autoregressive_generate(model, prompt_ids: list[int], max_new_tokens: int | None = None,
                            *, sampling: Sampling = GREEDY, mask_token_id: int | None = None,
                            stop_ids: Iterable[int] = (), stats: DecodeStats | None = None
                            ) -> Iterator[int]:
    """Tokens after `prompt_ids`, one forward each: greedy, or drawn as `sampling` says.
    Ends after the first of `stop_ids` or `max_new_tokens` tokens (None: when the consumer
    stops). A unified student's `mask_token_id` is never produced."""
    stats = stats if stats is not None else DecodeStats()
    steps = _next_tokens(model, list(prompt_ids), sampling, mask_token_id, stats)
    return emit_tokens(steps, max_new_tokens, stop_ids, stats)


@torch.inference_mode()
def _next_tokens(model, prompt_ids: list[int], sampling: Sampling, mask_token_id: int | None,
                 stats: DecodeStats) -> Iterator[list[int]]:
    sequence = CachedSequence(model, stats)
    generator = seeded_generator(sampling, sequence.device)
    logits = sequence.prefill(prompt_ids)
    while True:
        token = sample_token(without_token(logits, mask_token_id), sampling, generator)
        yield [token]
        logits = sequence.forward([token])[-1]

