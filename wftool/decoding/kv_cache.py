"""One sequence in a model's KV cache: the forwards every decoding mode is built from.

A forward feeds tokens at the next positions (explicit position ids) against everything
cached. Kept tokens stay cached; a look-ahead forward (a diffusion block being denoised, a
draft) is cropped back out. So the cache only ever holds the clean sequence, computed
causally: exactly the cache of autoregressive decoding, which the AR head of speculative
decoding verifies against.

Within a look-ahead block, attention is causal or bidirectional. transformers builds the
causal mask itself (attention_mask None); a bidirectional block gets an explicit 4D mask
[1, 1, q, cached + q], which masking_utils passes through to the attention unchanged.
"""

from __future__ import annotations

import inspect

import torch

from wftool.decoding.stats import DecodeStats

# Attention modes (DiffusionSettings.attention) whose denoised block sees itself whole.
BIDIRECTIONAL = ("bidirectional", "block")
# Attention implementations that take an arbitrary 4D mask: sdpa as a boolean mask (True =
# attend, torch's convention), eager as an additive one.
MASKABLE_ATTENTION = ("sdpa", "eager")


def block_attention_mask(cached: int, size: int, bidirectional: bool, model) -> torch.Tensor:
    """[1, 1, size, cached + size]: each of `size` new positions sees every cached position,
    and within the block every position (bidirectional) or the earlier ones and itself.
    Boolean for sdpa, additive (0 or the dtype's minimum) for eager attention."""
    device = _device(model)
    allowed = torch.ones(size, cached + size, dtype=torch.bool, device=device)
    if not bidirectional:
        allowed[:, cached:] = torch.ones(size, size, dtype=torch.bool, device=device).tril()
    allowed = allowed[None, None]
    if model.config._attn_implementation == "eager":
        dtype = model.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return allowed


def lookahead_problem(model, attention: str) -> str | None:
    """Why `model` cannot denoise or draft with `attention` against a KV cache, or None: a
    bidirectional block needs a 4D mask, which only sdpa and eager attention take, and a
    look-ahead is cropped back out of the cache, which sliding-window and recurrent layers
    cannot undo."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    implementation = model.config._attn_implementation
    if attention in BIDIRECTIONAL and implementation not in MASKABLE_ATTENTION:
        return (f"a bidirectional block needs sdpa or eager attention, not {implementation!r} "
                "(load the model with attn_implementation='sdpa')")
    layers = getattr(DynamicCache(config=model.config), "layers", [])
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd:
        return (f"its KV cache has {', '.join(odd)} layers (sliding-window or recurrent "
                "attention), which cannot be cropped back after a look-ahead")
    return None


def checked_block_size(model, settings, block_size: int | None, mode: str) -> int:
    """The block size a look-ahead decoder uses (default: the student's), after checking it
    and that `model` can look ahead at all (a clear error naming `mode` if not)."""
    from wftool.errors import WftError

    block_size = settings.block_size if block_size is None else block_size
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    problem = lookahead_problem(model, settings.attention)
    if problem:
        raise WftError(f"{mode} decoding cannot run on this model: {problem}")
    return block_size


def _device(model) -> torch.device:
    return next(model.parameters()).device


class CachedSequence:
    """The tokens of one sequence held in `model`'s KV cache (`length` of them), and the
    forwards that extend it. Every forward after `prefill` is counted in `stats`."""

    def __init__(self, model, stats: DecodeStats | None = None):
        from transformers import DynamicCache

        self.model = model
        self.device = _device(model)
        self.stats = stats if stats is not None else DecodeStats()
        self.cache = DynamicCache(config=model.config)
        self.length = 0
        forward = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name
        # warns, and goes in 5.40); earlier 5.x releases only know the old one.
        self._cache_keyword = "cache" if "cache" in forward else "past_key_values"
        self._trims_logits = "logits_to_keep" in forward

    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        """Cache the prompt; the logits [V] its last position gives (the next token's)."""
        if not prompt_ids:
            raise ValueError("decoding needs a prompt of at least one token")
        self.stats.prompt_tokens += len(prompt_ids)
        # Only the last position's logits are needed: skip the head's matmul for the rest.
        trim = {"logits_to_keep": 1} if self._trims_logits else {}
        return self._run(prompt_ids, "causal", **trim)[-1]

    def forward(self, ids: list[int], *, attention: str = "causal",
                keep: bool = True) -> torch.Tensor:
        """Logits [len(ids), V] (float32) of `ids` fed at the next positions. `attention`
        within them: "causal", or "bidirectional"/"block" (each sees all of them). Kept,
        they stay cached; else the cache is cropped back (a denoising or draft forward)."""
        start = self.length
        logits = self._run(ids, attention)
        self.stats.forwards += 1
        if not keep:
            self.stats.denoising_forwards += 1
            self.crop(start)
        return logits

    def crop(self, length: int) -> None:
        """Forget every cached token from position `length` on."""
        extra = self.length - length
        if extra > 0:
            # A negative count removes that many tokens in every transformers 5.x release
            # (a positive one meant a length before 5.24, and is refused since).
            self.cache.crop(-extra)
            self.length = length

    def _run(self, ids: list[int], attention: str, **extra) -> torch.Tensor:
        size = len(ids)
        mask = None  # transformers' own causal mask, offset by the cache
        if attention in BIDIRECTIONAL and size > 1:
            mask = block_attention_mask(self.length, size, True, self.model)
        positions = torch.arange(self.length, self.length + size, device=self.device)
        output = self.model(input_ids=torch.tensor([ids], device=self.device),
                            position_ids=positions[None], attention_mask=mask,
                            use_cache=True, **{self._cache_keyword: self.cache}, **extra)
        self.length += size
        return output.logits[0].float()
