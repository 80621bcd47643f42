"""What a decoder did (forwards, tokens, time) and the common end of every decoding mode:
stop ids, the token limit, and the clock."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator


@dataclass
class DecodeStats:
    """Counts a decoder adds to; one object may gather several generations (sums).

    `forwards` counts model forwards after the prompt's prefill, `denoising_forwards` those
    of them whose tokens were not kept (diffusion denoising steps, speculative drafts).
    `seconds` is the time spent inside the decoder, prefill included, not the time its
    consumer spends between tokens.
    """

    prompt_tokens: int = 0
    tokens: int = 0
    forwards: int = 0
    denoising_forwards: int = 0
    drafted: int = 0  # speculative: draft tokens offered for verification
    accepted: int = 0  # speculative: draft tokens the AR head accepted
    seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(self.forwards, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def acceptance(self) -> float:
        """Share of drafted tokens accepted (speculative decoding)."""
        return self.accepted / self.drafted if self.drafted else 0.0


def emit_tokens(chunks: Iterator[list[int]], max_new_tokens: int | None,
                stop_ids: Iterable[int], stats: DecodeStats) -> Iterator[int]:
    """The tokens of `chunks` (each list as a decoder finishes it) one by one, up to and
    including the first stop id, at most `max_new_tokens` (None: no limit). Counts them and
    the time spent producing them into `stats`; closes `chunks` when done, so a decoder
    never runs a forward nobody will read."""
    stop_ids = frozenset(stop_ids)
    produced = 0
    try:
        while max_new_tokens is None or produced < max_new_tokens:
            start = time.perf_counter()
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            finally:
                stats.seconds += time.perf_counter() - start
            for token in chunk:
                produced += 1
                stats.tokens += 1
                yield token
                if token in stop_ids or produced == max_new_tokens:
                    return
    finally:
        chunks.close()
