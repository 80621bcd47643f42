"""The losses of every stage: the formulas as plain functions of tensors (METHOD.md sections
3-5), then each stage's objective, which turns a batch into a loss.

An objective is called as `objective(model, batch, progress)` with `progress` in [0, 1] and
returns `(loss, parts)`: the loss to back-propagate and its named parts as detached tensors
(the trainer copies them to the host only on logging steps). An objective may also carry
`hooks`, run by the trainer around each optimizer step (see `wftool.train.hooks`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from wftool.data.packing import IGNORE_INDEX, model_inputs
from wftool.model.families import Family
from wftool.recipe.schema import DistillStage, LayerwiseStage
from wftool.train.capture import capture_qkv
from wftool.train.moe_balance import RouterBalance

# objective(model, batch, progress in [0, 1]) -> (loss, {part name: detached tensor})
Objective = Callable[[torch.nn.Module, dict, float], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over labelled positions (labels shifted here)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def layer_weights(n_layers: int, scheme: str) -> torch.Tensor:
    """Per-layer weights summing to 1; `linear` weights later layers more (l / sum l)."""
    if scheme == "uniform":
        weights = torch.ones(n_layers)
    elif scheme == "linear":
        weights = torch.arange(1, n_layers + 1, dtype=torch.float32)
    else:
        raise ValueError(f"unknown layer weighting {scheme!r}")
    return weights / weights.sum()


def _normalize(hidden: torch.Tensor, how: str) -> torch.Tensor:
    hidden = hidden.float()
    if how == "l2":
        return F.normalize(hidden, dim=-1)
    if how == "rms":
        return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
    raise ValueError(f"unknown normalisation {how!r}")


def hidden_state_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    weights: torch.Tensor,
    normalize: str = "l2",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_l w_l * MSE(norm(h_s^l), norm(h_t^l)), squared error summed over the hidden
    dimension and averaged over (non-padding) tokens."""
    if len(student) != len(teacher) or len(student) != len(weights):
        raise ValueError("student, teacher and weights must cover the same layers")
    total = student[0].new_zeros((), dtype=torch.float32)
    for w, hs, ht in zip(weights.tolist(), student, teacher):
        per_token = (_normalize(hs, normalize) - _normalize(ht, normalize)).pow(2).sum(-1)
        total = total + w * _masked_mean(per_token, mask)
    return total


def logits_kl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """tau^2 * KL(teacher || student) of softmax(logits / tau), mean over non-padding tokens."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return temperature**2 * _masked_mean(per_token, mask)


def attention_relation_loss(
    student: dict[str, torch.Tensor],
    teacher: dict[str, torch.Tensor],
    relation_heads: int = 32,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MiniLMv2 multi-head relation distillation over Q, K and V at one layer.

    Each [batch, seq, width] state is split into `relation_heads` heads, every token vector
    is L2-normalised, relations are softmax(A A^T) over the sequence (cosine relations, as the
    official BitDistill code), and KL(teacher || student) is averaged over heads and query
    rows. The sum over Q, K, V carries the official code's extra 1 / relation_heads factor.
    """
    total = None
    for name in ("q", "k", "v"):
        s_rel = _relation_log_probs(student[name], relation_heads, mask)
        t_rel = _relation_log_probs(teacher[name], relation_heads, mask)
        per_row = (t_rel.exp() * (t_rel - s_rel)).sum(-1)  # [batch, heads, seq]
        row_mask = None if mask is None else mask[:, None, :].expand_as(per_row)
        term = _masked_mean(per_row, row_mask)
        total = term if total is None else total + term
    return total / relation_heads


def _relation_log_probs(states: torch.Tensor, heads: int, mask: torch.Tensor | None):
    batch, seq, width = states.shape
    if width % heads:
        raise ValueError(f"width {width} is not divisible by {heads} relation heads")
    split = states.float().reshape(batch, seq, heads, width // heads).transpose(1, 2)
    split = F.normalize(split, dim=-1)
    scores = split @ split.transpose(-1, -2)  # [batch, heads, seq, seq]
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    log_probs = F.log_softmax(scores, dim=-1)
    # Padded keys: probability 0 for both models; a finite log keeps 0 * (a - a) at 0.
    return log_probs.clamp(min=-1e9) if mask is not None else log_probs


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


# ---- stage objectives ---------------------------------------------------------------------

class LanguageModeling:
    """`pretrain` (and task fine-tuning): next-token CE on the labelled tokens (plus the
    router's load-balancing loss for an MoE student)."""

    def __init__(self, balance: RouterBalance | None = None):
        self.balance = balance or RouterBalance()

    def __call__(self, model, batch, progress):
        with self.balance.recording():
            logits = model(**model_inputs(batch)).logits
        ce = causal_lm_loss(logits, batch["labels"])
        parts = {"ce": ce.detach()}
        return self.balance.add(ce, parts, batch.get("attention_mask")), parts


class LayerwiseDistillation:
    """`layerwise`: normalised hidden-state MSE per layer against the frozen teacher, later
    layers weighted more, plus an optional CE term; the distillation share decays linearly
    from 1 to `distill_share_end` over the run. An MoE student adds its router's
    load-balancing loss."""

    # With ce_weight 0 an untied lm_head gets no gradient: DDP must not wait for one.
    leaves_parameters_unused = True

    def __init__(self, teacher: torch.nn.Module, spec: LayerwiseStage, n_layers: int,
                 balance: RouterBalance | None = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.spec = spec
        self.weights = layer_weights(n_layers, spec.layer_weighting)
        self.balance = balance or RouterBalance()

    def __call__(self, model, batch, progress):
        inputs = model_inputs(batch)
        with self.balance.recording():
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
        parts = {"hidden": hidden.detach()}
        if self.spec.ce_weight > 0:
            ce = causal_lm_loss(out.logits, batch["labels"])
            loss = loss + self.spec.ce_weight * ce
            parts["ce"] = ce.detach()
        return self.balance.add(loss, parts, mask), parts

    def held_out(self, outputs, batch) -> dict[str, torch.Tensor]:
        """The stage's own objective on held-out data (`eval_hidden`), from the student's
        evaluation forward (`outputs`, with hidden states)."""
        with torch.no_grad():
            teacher_hidden = self.teacher(**model_inputs(batch),
                                          output_hidden_states=True).hidden_states
        hidden = hidden_state_loss(list(outputs.hidden_states[1:]), list(teacher_hidden[1:]),
                                   self.weights, self.spec.normalize,
                                   batch.get("attention_mask"))
        return {"hidden": hidden}


class Distillation:
    """`distill`: CE on answers + lambda * tau^2 KL(teacher || student) + gamma * relation
    loss on Q, K, V at one layer (plus the router's load-balancing loss for an MoE
    student)."""

    def __init__(self, teacher: torch.nn.Module, spec: DistillStage, student_family: Family,
                 teacher_family: Family, n_layers: int, teacher_layers: int,
                 balance: RouterBalance | None = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.balance = balance or RouterBalance()
        self.spec = spec
        self.student_family, self.teacher_family = student_family, teacher_family
        self.student_layer = _layer_index(spec.attention_layer, n_layers)
        self.teacher_layer = _layer_index(spec.attention_layer, teacher_layers)

    def __call__(self, model, batch, progress):
        inputs = model_inputs(batch)
        spec = self.spec
        mask = batch.get("attention_mask")
        use_relations = spec.attention_weight > 0
        with (_maybe_capture(model, self.student_family, self.student_layer, use_relations)
              as s_qkv, self.balance.recording()):
            logits = model(**inputs).logits
        with torch.no_grad(), _maybe_capture(
            self.teacher, self.teacher_family, self.teacher_layer, use_relations
        ) as t_qkv:
            teacher_logits = self.teacher(**inputs).logits
        ce = causal_lm_loss(logits, batch["labels"])
        # A unified student's mask token lies past the teacher's vocabulary: never a target.
        kl = logits_kl_loss(logits[..., : teacher_logits.shape[-1]], teacher_logits,
                            spec.temperature, mask)
        loss = ce + spec.logits_weight * kl
        parts = {"ce": ce.detach(), "kl": kl.detach()}
        if use_relations:
            relation = attention_relation_loss(s_qkv, t_qkv, spec.relation_heads, mask)
            loss = loss + spec.attention_weight * relation
            parts["relation"] = relation.detach()
        return self.balance.add(loss, parts, mask), parts


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
    # torch.compile and DDP wrap the module; the capture hooks go on the original.
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return capture_qkv(model, family, layer) if enabled else _NoCapture()
