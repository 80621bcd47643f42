"""Noise and attention masks for masked-diffusion training (METHOD.md section 7).

Rows are packed documents whose position ids restart at 0 at every document (padded task
rows: one document plus padding). Every mask built here keeps documents apart, so neither
objective lets one document see another, and every query sees at least itself (a fully
masked row would make attention return NaN).
"""

from __future__ import annotations

import torch

# How the positions of a denoised row see each other.
ATTENTION_MODES = ("causal", "bidirectional", "anneal", "block")


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq] index of each token's document within its row (a new one starts
    wherever the position id does not continue the previous one)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(-1)


def training_attention_mask(position_ids: torch.Tensor, mode: str, *,
                            padding: torch.Tensor | None = None, block_size: int = 1,
                            lookahead: int = 0) -> torch.Tensor:
    """Boolean [batch, 1, seq, seq] mask (True = may attend) within each document.

    `causal`: earlier positions and itself; `bidirectional`: the whole document; `anneal`:
    causal plus `lookahead` positions ahead (grows from 0 to the row length as attention
    anneals to bidirectional); `block`: block-causal, blocks of `block_size` counted from
    the document start (a block sees itself and the blocks before it). `padding` ([batch,
    seq], 1 = real token) hides padded keys.
    """
    docs = document_ids(position_ids)
    allowed = docs[:, :, None] == docs[:, None, :]
    seq = position_ids.shape[1]
    index = torch.arange(seq, device=position_ids.device)
    query, key = index[:, None], index[None, :]
    if mode == "causal":
        allowed &= key <= query
    elif mode == "anneal":
        allowed &= key <= query + lookahead
    elif mode == "block":
        blocks = torch.div(position_ids, block_size, rounding_mode="floor")
        allowed &= blocks[:, None, :] <= blocks[:, :, None]
    elif mode != "bidirectional":
        raise ValueError(f"unknown attention mode {mode!r}; modes: {', '.join(ATTENTION_MODES)}")
    if padding is not None:
        allowed &= padding.bool()[:, None, :]
    allowed |= torch.eye(seq, dtype=torch.bool, device=position_ids.device)
    return allowed[:, None]


def block_context_mask(position_ids: torch.Tensor, copies: int, block_size: int, *,
                       padding: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean [batch, 1, n, n] mask (n = (1 + copies) * seq) of a block-diffusion row laid
    out as [clean | noisy copy 1 | ...] (BD3-LM, TiDAR): the clean part is causal within
    each document, as a KV cache built left to right holds it; each noisy copy sees its own
    block bidirectionally and the clean tokens of its document's earlier blocks, which is
    what block decoding sees. Blocks of `block_size` count from each document's start."""
    seq = position_ids.shape[1]
    docs = document_ids(position_ids)
    same = docs[:, :, None] == docs[:, None, :]
    index = torch.arange(seq, device=position_ids.device)
    blocks = torch.div(position_ids, block_size, rounding_mode="floor")
    causal = same & (index[None, None, :] <= index[None, :, None])
    earlier_blocks = same & (blocks[:, None, :] < blocks[:, :, None])
    own_block = same & (blocks[:, None, :] == blocks[:, :, None])
    if padding is not None:
        keys = padding.bool()[:, None, :]
        causal, earlier_blocks, own_block = causal & keys, earlier_blocks & keys, own_block & keys
    parts = 1 + copies
    allowed = torch.zeros(position_ids.shape[0], parts * seq, parts * seq, dtype=torch.bool,
                          device=position_ids.device)
    allowed[:, :seq, :seq] = causal
    for copy in range(1, parts):
        rows = slice(copy * seq, (copy + 1) * seq)
        allowed[:, rows, :seq] = earlier_blocks
        allowed[:, rows, rows] = own_block
    allowed |= torch.eye(parts * seq, dtype=torch.bool, device=position_ids.device)
    return allowed[:, None]


def maskable_positions(labels: torch.Tensor, position_ids: torch.Tensor, shift: bool,
                       ignore_index: int = -100) -> torch.Tensor:
    """[batch, seq] positions the diffusion loss may mask and predict: labelled tokens;
    with the next-token shift, not a document's first token (the position before it belongs
    to another document, which it cannot see)."""
    eligible = labels != ignore_index
    if shift:
        eligible &= position_ids != 0
        eligible[:, 0] = False
    return eligible


def sample_noise(eligible: torch.Tensor, low: float, high: float,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [batch], masked [batch, seq]): a noise level per row, t ~ U(low, high), and each
    eligible token masked with probability t."""
    # A seeded generator (held-out scoring) draws on its own device, the same on any GPU.
    device = generator.device if generator is not None else eligible.device
    uniform = torch.rand(eligible.shape[0], generator=generator, device=device)
    t = (low + (high - low) * uniform).to(eligible.device)
    draws = torch.rand(eligible.shape, generator=generator, device=device).to(eligible.device)
    return t, (draws < t[:, None]) & eligible
