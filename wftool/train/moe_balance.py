"""The router's load-balancing loss of mixture-of-experts students, and how evenly they route.

Every MoE family in transformers scores routing with the Switch Transformer loss
(`load_balancing_loss_func`): E * sum_e f_e * P_e, where f_e is the share of top-k
assignments expert e receives and P_e its mean router probability, both over the layers'
(non-padding) tokens. Training the student without it lets the ternary routers collapse
onto a few experts.

The router logits are read by forward hooks on the family's router modules (the ones
transformers itself records as `router_logits`) rather than with `output_router_logits=True`:
the causal LM then computes its own aux loss from the attention mask it was given, which
fails for the 4-D masks the `unified` stage passes. The hooks are registered once, so a
compiled model sees the same hooks on every step; they keep logits only inside `recording()`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from wftool.recipe.schema import TrainingSpec


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile and DDP wrap the module; the config and routers live on the original.
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _experts_and_top_k(model: nn.Module) -> tuple[int, int]:
    config = getattr(_unwrap(model), "config", None)
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    return experts or 0, getattr(config, "num_experts_per_tok", None) or 0


def is_moe(model: nn.Module) -> bool:
    """Whether the model's config describes routed experts (several experts and a top-k
    router)."""
    experts, top_k = _experts_and_top_k(model)
    return experts > 1 and top_k > 0


def router_aux_weight(model: nn.Module, training: TrainingSpec) -> float:
    """The load-balancing loss weight: `training.router_aux_loss_weight`, else the model
    config's `router_aux_loss_coef`, else 0."""
    if training.router_aux_loss_weight is not None:
        return float(training.router_aux_loss_weight)
    config = getattr(_unwrap(model), "config", None)
    return float(getattr(config, "router_aux_loss_coef", None) or 0.0)


def _routing(router_logits: Sequence[torch.Tensor], top_k: int,
             attention_mask: torch.Tensor | None):
    """Per layer: (router probabilities [tokens, E], top-k assignment counts [tokens, E]),
    and the token weights [tokens] (0 for padding)."""
    tokens, experts = router_logits[0].shape
    weights = (torch.ones(tokens, device=router_logits[0].device) if attention_mask is None
               else attention_mask.reshape(-1).to(router_logits[0].device, torch.float32))
    layers = []
    for logits in router_logits:
        probs = F.softmax(logits.float(), dim=-1)
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, experts).sum(1).float()
        layers.append((probs, chosen))
    return layers, weights


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int,
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The Switch Transformer loss over all layers, as transformers computes it:
    E * sum_e (assignments to e / tokens) * (probability mass on e / tokens), tokens
    counted over every layer and weighted by `attention_mask` ([batch, seq], 1 = token)."""
    layers, weights = _routing(router_logits, top_k, attention_mask)
    experts = router_logits[0].shape[-1]
    assigned = sum(weights @ chosen for _, chosen in layers)
    probability = sum(weights @ probs for probs, _ in layers)
    tokens = weights.sum() * len(layers)
    return experts * (assigned / tokens * probability / tokens).sum()


@torch.no_grad()
def expert_load(router_logits: Sequence[torch.Tensor], top_k: int,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """How unevenly tokens are routed: the most loaded expert's share of the top-k
    assignments over the balanced share 1 / E, averaged over layers. 1.0 is perfectly
    balanced; E / top_k means one expert is picked by every token."""
    layers, weights = _routing(router_logits, top_k, attention_mask)
    experts = router_logits[0].shape[-1]
    routed = weights.sum().clamp(min=1) * top_k
    peaks = [(weights @ chosen).max() / routed * experts for _, chosen in layers]
    return torch.stack(peaks).mean()


def _routers(student: nn.Module) -> tuple[list[nn.Module], int | None]:
    """The modules whose output transformers records as `router_logits`, and the index of
    the logits in their output (None: the whole output)."""
    for module in student.modules():
        recorder = (getattr(module, "_can_record_outputs", None) or {}).get("router_logits")
        if recorder is None:
            continue
        target = getattr(recorder, "target_class", recorder)
        index = getattr(recorder, "index", None)
        return [m for m in student.modules() if isinstance(m, target)], index
    return [], None


class RouterBalance:
    """What an objective adds for an MoE student: `weight * load_balancing_loss`, and the
    parts `moe_aux` and `expert_load`. For a dense model it adds nothing.

        with balance.recording():
            out = model(**inputs)
        loss = balance.add(loss, parts, attention_mask)
    """

    def __init__(self, student: nn.Module | None = None, weight: float = 0.0):
        self.weight = weight
        self._recorded: list[torch.Tensor] | None = None  # filled inside `recording()`
        self._last: list[torch.Tensor] | None = None  # the last recorded forward's logits
        routers, index = _routers(_unwrap(student)) if student is not None else ([], None)
        self.active = bool(routers) and is_moe(student)
        self.top_k = _experts_and_top_k(student)[1] if self.active else 0
        for router in routers if self.active else ():
            router.register_forward_hook(self._hook(index))

    def _hook(self, index: int | None):
        def keep_logits(module, args, output):
            if self._recorded is not None:
                self._recorded.append(output if index is None else output[index])
        return keep_logits

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Keep the router logits of the student forward inside the block."""
        self._recorded = [] if self.active else None
        try:
            yield
        finally:
            self._last, self._recorded = self._recorded, None

    def add(self, loss: torch.Tensor, parts: dict[str, torch.Tensor],
            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`loss` plus the weighted load-balancing loss of the last recorded forward, whose
        tokens `attention_mask` ([rows, seq] of that forward, 1 = token) marks; sets the
        parts. Unchanged for a dense model."""
        if not self.active:
            return loss
        logits, self._last = self._last, None
        aux = load_balancing_loss(logits, self.top_k, attention_mask)
        parts["moe_aux"] = aux.detach()
        parts["expert_load"] = expert_load(logits, self.top_k, attention_mask)
        return loss + self.weight * aux


def router_balance(student: nn.Module, training: TrainingSpec) -> RouterBalance:
    """The balance term of `student` (unwrapped) under `training`'s weight. The model's own
    aux loss is switched off: wft adds it here, and transformers' version cannot read the
    4-D masks of `unified`."""
    config = getattr(_unwrap(student), "config", None)
    if getattr(config, "output_router_logits", False):
        config.output_router_logits = False
    return RouterBalance(student, router_aux_weight(student, training))
