"""The decoding modes, chosen by name: what `wft serve` requests and evaluations select."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

from wftool.decoding.autoregressive import autoregressive_generate
from wftool.decoding.block_diffusion import diffusion_generate
from wftool.decoding.sampling import GREEDY, Sampling
from wftool.decoding.speculative import speculative_generate
from wftool.decoding.stats import DecodeStats
from wftool.model.mask_token import DiffusionSettings, diffusion_settings, require_diffusion

DECODING_MODES = ("ar", "diffusion", "speculative")
# Modes that need a unified student (a mask token and its DiffusionSettings).
DIFFUSION_MODES = ("diffusion", "speculative")
DEFAULT_THRESHOLD = 0.9


@dataclass(frozen=True)
class Decoding:
    """How to decode. `block_size` None: the student's; `threshold` and `steps_per_block`
    apply to `diffusion` only (see diffusion_generate)."""

    mode: str = "ar"
    block_size: int | None = None
    threshold: float = DEFAULT_THRESHOLD
    steps_per_block: int | None = None

    def __post_init__(self):
        if self.mode not in DECODING_MODES:
            raise ValueError(f"decoding mode {self.mode!r} is not one of "
                             f"{', '.join(DECODING_MODES)}")


AUTOREGRESSIVE = Decoding()


def decode(model, prompt_ids: list[int], max_new_tokens: int | None,
           decoding: Decoding = AUTOREGRESSIVE, *, sampling: Sampling = GREEDY,
           settings: DiffusionSettings | None = None, stop_ids: Iterable[int] = (),
           stats: DecodeStats | None = None) -> Iterator[int]:
    """Tokens after `prompt_ids` decoded as `decoding` says. `settings`: the student's
    DiffusionSettings (default: read from its config); the diffusion modes need them, and
    with them no mode produces the mask token. `max_new_tokens` None (no limit) is for
    autoregressive decoding only."""
    settings = settings if settings is not None else diffusion_settings(model)
    if decoding.mode == "ar":
        return autoregressive_generate(
            model, prompt_ids, max_new_tokens, sampling=sampling, stop_ids=stop_ids,
            mask_token_id=None if settings is None else settings.mask_token_id, stats=stats)
    if settings is None:
        settings = require_diffusion(model, f"{decoding.mode} decoding")
    if max_new_tokens is None:
        raise ValueError(f"{decoding.mode} decoding needs max_new_tokens")
    if decoding.mode == "diffusion":
        return diffusion_generate(model, prompt_ids, settings, max_new_tokens,
                                  block_size=decoding.block_size, threshold=decoding.threshold,
                                  steps_per_block=decoding.steps_per_block, sampling=sampling,
                                  stop_ids=stop_ids, stats=stats)
    return speculative_generate(model, prompt_ids, settings, max_new_tokens,
                                block_size=decoding.block_size, sampling=sampling,
                                stop_ids=stop_ids, stats=stats)
