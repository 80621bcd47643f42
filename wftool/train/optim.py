"""Optimizers and learning-rate schedules from a recipe's `training` section."""

from __future__ import annotations

import math

import torch
from torch import nn

from wftool.recipe.schema import TrainingSpec


def lr_factor(step: int, spec: TrainingSpec) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based)."""
    warmup = min(spec.warmup_steps, spec.max_steps)
    if warmup and step < warmup:
        return (step + 1) / warmup
    floor = spec.min_lr_ratio
    if spec.schedule == "constant":
        return 1.0
    if spec.schedule == "cosine":
        span = max(spec.max_steps - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if spec.schedule == "wsd":  # warmup, stable, then linear decay over the last fraction
        decay_steps = max(int(round(spec.decay_fraction * spec.max_steps)), 1)
        decay_start = spec.max_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min((step - decay_start + 1) / decay_steps, 1.0)
        return 1.0 - (1.0 - floor) * progress
    raise ValueError(f"unknown schedule {spec.schedule!r}")


def _gains(model: nn.Module) -> set[int]:
    """ids of normalisation gains: never decayed, never orthogonalised, whatever their
    shape (an MoE expert's SubLN holds one gain row per expert: [E, I])."""
    return {id(param) for module in model.modules() if "Norm" in type(module).__name__
            for param in module.parameters(recurse=False)}


def _is_hidden_matrix(name: str, param: nn.Parameter, model: nn.Module) -> bool:
    """Muon updates 2-D weights inside the blocks (MoE routers included); embeddings and
    lm_head stay on AdamW. MoE experts stored as one [E, out, in] tensor are not hidden
    matrices here: torch.optim.Muon takes only 2-D parameters, so they go to AdamW with
    weight decay (see `build_optimizers`)."""
    if param.ndim != 2:
        return False
    embeddings = {id(model.get_input_embeddings().weight)}
    output = model.get_output_embeddings()
    if output is not None:
        embeddings.add(id(output.weight))
    return id(param) not in embeddings


def build_optimizers(model: nn.Module, spec: TrainingSpec,
                     sharded: bool = False) -> list[torch.optim.Optimizer]:
    """AdamW for everything, or Muon for hidden matrices with AdamW for the rest.
    `sharded`: the parameters are FSDP2 shards, which Muon updates through `ShardedMuon`.

    Under Muon, tensors of 3 or more dimensions (MoE experts as [E, out, in]) go to AdamW
    with weight decay, like the embeddings: orthogonalising them per expert would need
    one 2-D view per expert, which torch.optim.Muon cannot take."""
    gains = _gains(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and id(p) not in gains]
    no_decay = [p for n, p in named if p.ndim < 2 or id(p) in gains]
    adamw_kwargs = dict(lr=spec.lr, betas=spec.betas, eps=1e-8)
    if spec.optimizer == "adamw":
        groups = [
            {"params": decay, "weight_decay": spec.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return [torch.optim.AdamW(groups, **adamw_kwargs)]
    if spec.optimizer == "muon":
        hidden = [p for n, p in named if _is_hidden_matrix(n, p, model) and id(p) not in gains]
        hidden_ids = {id(p) for p in hidden}
        rest_decay = [p for p in decay if id(p) not in hidden_ids]
        muon_class = torch.optim.Muon
        if sharded:
            from wftool.train.muon import ShardedMuon as muon_class
        muon = muon_class(
            hidden, lr=spec.lr, weight_decay=spec.weight_decay, adjust_lr_fn="match_rms_adamw"
        )
        adamw = torch.optim.AdamW(
            [
                {"params": rest_decay, "weight_decay": spec.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            **adamw_kwargs,
        )
        return [muon, adamw]
    raise ValueError(f"unknown optimizer {spec.optimizer!r}")


def build_schedulers(optimizers, spec: TrainingSpec):
    return [
        torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, spec))
        for opt in optimizers
    ]
