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
    maskable_positions,
    sample_noise,
    training_attention_mask,
)
from wftool.train.unified import masked_accuracy, masked_diffusion_loss

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
        ids, positions = batch["input_ids"], batch["position_ids"]
        eligible = maskable_positions(batch["labels"], positions, settings.shift)
        t, masked = sample_noise(eligible, NOISE_FLOOR, 1.0, generator)
        noisy = torch.where(masked, torch.full_like(ids, settings.mask_token_id), ids)
        attention = training_attention_mask(positions, settings.attention,
                                            padding=batch.get("attention_mask"),
                                            block_size=settings.block_size)
        with (autocast or contextlib.nullcontext)():
            logits = model(input_ids=noisy.to(device), position_ids=positions.to(device),
                           attention_mask=attention.to(device), use_cache=False).logits
        targets, masked, t = ids.to(device), masked.to(device), t.to(device)
        weighted += float(masked_diffusion_loss(logits, targets, masked, t, settings.shift, 1))
        scored = int(masked[:, 1:].sum() if settings.shift else masked.sum())
        right += round(float(masked_accuracy(logits, targets, masked, settings.shift)) * scored)
        masked_total += scored
        maskable_total += int(eligible.sum())
    model.train(was_training)
    if not maskable_total:
        return {}
    return {"dlm_loss": weighted / maskable_total,
            "dlm_accuracy": right / max(masked_total, 1)}

