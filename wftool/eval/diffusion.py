"""Held-out scores of a unified student's diffusion mode: the training estimator of the
masked-diffusion loss and the share of masked tokens it predicts right.

Masks come from a seeded generator, so every model (and every evaluation of one model) is
scored on the same masks; the attention is the one the student was trained with.
"""

from __future__ import annotations

import contextlib

import torch

from wftool.model.mask_token import DiffusionSettings
from wftool.train.diffusion_masks import (
    block_context_mask,
    maskable_positions,
    sample_noise,
    training_attention_mask,
)
from wftool.train.unified import block_predictions, masked_accuracy, masked_diffusion_loss

NOISE_FLOOR = 1e-3  # t ~ U(NOISE_FLOOR, 1), as unified.mask_eps's default


@torch.no_grad()
def diffusion_scores(model, batches: list[dict], settings: DiffusionSettings, device=None,
                     autocast=None, seed: int = 0) -> dict:
    """{"dlm_loss", "dlm_accuracy"} over `batches` (packed text or task rows: on a task the
    answer tokens are masked); {} when nothing could be masked."""
    device = device or next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    weighted, right, masked_total, maskable_total = 0.0, 0, 0, 0
    was_training = model.training
    model.eval()
    for batch in batches:
        eligible = maskable_positions(batch["labels"], batch["position_ids"], settings.shift)
        t, masked = sample_noise(eligible, NOISE_FLOOR, 1.0, generator)
        with (autocast or contextlib.nullcontext)():
            logits, targets, hidden = _denoised(model, batch, masked, settings, device)
        t = t.to(device)
        weighted += float(masked_diffusion_loss(logits, targets, hidden, t, False, 1))
        scored = int(hidden.sum())
        right += round(float(masked_accuracy(logits, targets, hidden, False)) * scored)
        masked_total += scored
        maskable_total += int(eligible.sum())
    model.train(was_training)
    if not maskable_total:
        return {}
    return {"dlm_loss": weighted / maskable_total,
            "dlm_accuracy": right / max(masked_total, 1)}


def _denoised(model, batch: dict, masked: torch.Tensor, settings: DiffusionSettings, device):
    """(logits, targets, masked) aligned position by position, from the layout the student
    was trained with: [clean | noisy] rows for block diffusion, noisy rows otherwise."""
    ids, positions = batch["input_ids"], batch["position_ids"]
    noisy = torch.where(masked, torch.full_like(ids, settings.mask_token_id), ids)
    padding = batch.get("attention_mask")
    ids, positions, masked = ids.to(device), positions.to(device), masked.to(device)
    if settings.attention == "block":
        allowed = block_context_mask(positions, 1, settings.block_size,
                                     padding=None if padding is None else padding.to(device))
        logits = model(input_ids=torch.cat([ids, noisy.to(device)], 1),
                       position_ids=positions.repeat(1, 2), attention_mask=allowed,
                       use_cache=False).logits
        seq = ids.shape[1]
        return block_predictions(logits[:, :seq], logits[:, seq:], ids, masked, positions,
                                 settings.block_size, settings.shift)
    allowed = training_attention_mask(positions, settings.attention,
                                      padding=None if padding is None else padding.to(device))
    logits = model(input_ids=noisy.to(device), position_ids=positions,
                   attention_mask=allowed, use_cache=False).logits
    if settings.shift:
        return logits[:, :-1], ids[:, 1:], masked[:, 1:]
    return logits, ids, masked

