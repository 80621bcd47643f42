"""Each stage's objective: how a batch becomes a loss (the formulas live in objectives.py)."""

from __future__ import annotations

import torch

from wftool.data.packing import model_inputs
from wftool.model.families import Family
from wftool.recipe.schema import DistillStage, LayerwiseStage
from wftool.train.capture import capture_qkv
from wftool.train.objectives import (
    attention_relation_loss,
    causal_lm_loss,
    hidden_state_loss,
    layer_weights,
    logits_kl_loss,
)


class LanguageModeling:
    """`pretrain` (and task fine-tuning): next-token CE on the labelled tokens."""

    def __call__(self, model, batch, progress):
        logits = model(**model_inputs(batch)).logits
        loss = causal_lm_loss(logits, batch["labels"])
        return loss, {"ce": loss.item()}


class LayerwiseDistillation:
    """`layerwise`: normalised hidden-state MSE per layer against the frozen teacher, later
    layers weighted more, plus an optional CE term; the distillation share decays linearly
    from 1 to `distill_share_end` over the run."""

    def __init__(self, teacher: torch.nn.Module, spec: LayerwiseStage, n_layers: int):
        self.teacher = teacher.eval().requires_grad_(False)
        self.spec = spec
        self.weights = layer_weights(n_layers, spec.layer_weighting)

    def __call__(self, model, batch, progress):
        inputs = model_inputs(batch)
        out = model(**inputs, output_hidden_states=True)
        with torch.no_grad():
            teacher_hidden = self.teacher(**inputs, output_hidden_states=True).hidden_states
        mask = batch.get("attention_mask")
        hidden = hidden_state_loss(
            list(out.hidden_states[1:]), list(teacher_hidden[1:]), self.weights,
            self.spec.normalize, mask,
        )
        share = 1.0 + (self.spec.distill_share_end - 1.0) * progress
        loss = share * hidden
        parts = {"hidden": hidden.item()}
        if self.spec.ce_weight > 0:
            ce = causal_lm_loss(out.logits, batch["labels"])
            loss = loss + self.spec.ce_weight * ce
            parts["ce"] = ce.item()
        return loss, parts


class Distillation:
    """`distill`: CE on answers + lambda * tau^2 KL(teacher || student) + gamma * relation
    loss on Q, K, V at one layer."""

    def __init__(self, teacher: torch.nn.Module, spec: DistillStage, student_family: Family,
                 teacher_family: Family, n_layers: int, teacher_layers: int):
        self.teacher = teacher.eval().requires_grad_(False)
        self.spec = spec
        self.student_family, self.teacher_family = student_family, teacher_family
        self.student_layer = _layer_index(spec.attention_layer, n_layers)
        self.teacher_layer = _layer_index(spec.attention_layer, teacher_layers)

    def __call__(self, model, batch, progress):
        inputs = model_inputs(batch)
        spec = self.spec
        mask = batch.get("attention_mask")
        use_relations = spec.attention_weight > 0
        with _maybe_capture(model, self.student_family, self.student_layer, use_relations) as s_qkv:
            logits = model(**inputs).logits
        with torch.no_grad(), _maybe_capture(
            self.teacher, self.teacher_family, self.teacher_layer, use_relations
        ) as t_qkv:
            teacher_logits = self.teacher(**inputs).logits
        ce = causal_lm_loss(logits, batch["labels"])
        kl = logits_kl_loss(logits, teacher_logits, spec.temperature, mask)
        loss = ce + spec.logits_weight * kl
        parts = {"ce": ce.item(), "kl": kl.item()}
        if use_relations:
            relation = attention_relation_loss(s_qkv, t_qkv, spec.relation_heads, mask)
            loss = loss + spec.attention_weight * relation
            parts["relation"] = relation.item()
        return loss, parts


def _layer_index(index: int, n_layers: int) -> int:
    resolved = index if index >= 0 else n_layers + index
    if not 0 <= resolved < n_layers:
        raise ValueError(f"attention_layer {index} is outside a {n_layers}-layer model")
    return resolved


class _NoCapture:
    def __enter__(self):
        return {}

    def __exit__(self, *exc):
        return False


def _maybe_capture(model, family, layer, enabled):
    # torch.compile wraps the module; the capture hooks go on the original.
    model = getattr(model, "_orig_mod", model)
    return capture_qkv(model, family, layer) if enabled else _NoCapture()
