"""Decoding a causal LM, or a unified (AR + masked-diffusion) student, from a KV cache.

Three modes share one cache plumbing (kv_cache.CachedSequence) and one sampling rule
(sampling.py): `ar` (autoregressive.py, one forward per token), `diffusion`
(block_diffusion.py: blocks of mask tokens unmasked by confidence) and `speculative`
(speculative.py: diffusion drafts, the AR head verifies; greedy output equals `ar`).
`decode` picks one by name; every mode counts its forwards, tokens and time in a
DecodeStats.
"""

from wftool.decoding.autoregressive import autoregressive_generate
from wftool.decoding.block_diffusion import diffusion_generate
from wftool.decoding.modes import (AUTOREGRESSIVE, DECODING_MODES, DIFFUSION_MODES, Decoding,
                                   decode)
from wftool.decoding.sampling import GREEDY, Sampling
from wftool.decoding.speculative import speculative_generate
from wftool.decoding.stats import DecodeStats

__all__ = [
    "AUTOREGRESSIVE", "DECODING_MODES", "DIFFUSION_MODES", "GREEDY", "DecodeStats", "Decoding",
    "Sampling", "autoregressive_generate", "decode", "diffusion_generate",
    "speculative_generate",
]
