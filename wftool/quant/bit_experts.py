"""BitExperts: a drop-in for a Hugging Face MoE experts module with BitNet b1.58 projections.

transformers keeps all of a layer's routed experts in one module with 3-D parameters,
`gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]. BitExperts keeps those names and
shapes, so save_pretrained / from_pretrained handle a student's weights as they handle the
teacher's, and runs the same routing loop, but every expert matrix goes through BitLinear's
autograd function: ternary weights with one absmean scale per expert matrix (gate, up and
down of each expert separately, as a GGUF stores them per expert), int8 activations per
token, straight-through gradients into the fp32 latent 3-D parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from wftool.quant.bitlinear import bitlinear


class ExpertRMSNorm(nn.Module):
    """Weight-only RMSNorm with one weight row per expert: the SubLN in front of each
    expert's down projection (weight [E, I], starts at 1)."""

    def __init__(self, num_experts: int, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_experts, width))
        self.eps = eps

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        # Same numerics as wftool.quant.bitlinear.RMSNorm, with the expert's own weight row.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight[expert] * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


def route_to_experts(hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor, num_experts: int,
                     expert_ffn: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The eager loop of transformers' experts modules: `expert_ffn(expert, tokens)` for each
    expert some token picked, weighted by the router and summed per token."""
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=num_experts + 1)
        expert_mask = expert_mask.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert in expert_hit[:, 0].tolist():
        if expert == num_experts:  # the slot transformers uses for dropped tokens
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert])
        out = expert_ffn(expert, hidden_states[token_idx])
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, out.to(final_hidden_states.dtype))
    return final_hidden_states


class RoutedExperts(nn.Module):
    """What the training and the packed form of routed experts share: transformers' routing
    loop and one expert's gated FFN; a subclass says how one projection is computed
    (`_project(x, "gate" | "up" | "down", expert)`) and sets `ffn_sub_norm` (a per-expert
    SubLN, or None)."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [T, H], top_k_index / top_k_weights [T, K] -> [T, H]."""
        return route_to_experts(hidden_states, top_k_index, top_k_weights, self.num_experts,
                                self._expert_ffn)

    def _expert_ffn(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act_fn(self._project(x, "gate", expert)) * self._project(x, "up", expert)
        if self.ffn_sub_norm is not None:
            hidden = self.ffn_sub_norm(hidden, expert)
        return self._project(hidden, "down", expert)


class BitExperts(RoutedExperts):
    """Routed experts whose gate, up and down projections see ternary weights.

    Attributes mirror BitLinear's: ``quant_mix`` / ``warming_up`` (quantization warm-up),
    ``quantize_input`` (False only for comparisons with float-activation runtimes) and
    ``sparsity`` (Q-Sparse). ``ffn_sub_norm`` is the optional per-expert SubLN ("paper"
    placement), saved as ``<experts>.ffn_sub_norm.weight``.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_dim: int,
        intermediate_dim: int,
        act_fn: nn.Module,
        *,
        sub_norm_eps: float | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        factory = {"device": device, "dtype": dtype}
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_dim, hidden_dim, **factory))
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_dim, intermediate_dim, **factory))
        self.act_fn = act_fn
        self.ffn_sub_norm = (
            ExpertRMSNorm(num_experts, intermediate_dim, sub_norm_eps).to(**factory)
            if sub_norm_eps else None
        )
        # A buffer, as in BitLinear, so ramping the warm-up does not recompile.
        self.register_buffer(
            "quant_mix", torch.ones((), dtype=torch.float32, device=device), persistent=False)
        self.warming_up = False
        self.quantize_input = True
        self.sparsity = 0.0

    @classmethod
    def from_experts(cls, module: nn.Module, sub_norm_eps: float | None = None) -> BitExperts:
        """A BitExperts that takes over a transformers experts module's parameters (no copy).
        `sub_norm_eps` adds the per-expert SubLN before down_proj with that eps."""
        unsupported = [name for name, _ in module.named_parameters()
                       if name not in ("gate_up_proj", "down_proj")]
        if unsupported:
            raise ValueError(f"{type(module).__name__} has parameters BitExperts does not "
                             f"handle: {', '.join(unsupported)}")
        num_experts, double_intermediate, hidden_dim = module.gate_up_proj.shape
        weight = module.gate_up_proj
        experts = cls(num_experts, hidden_dim, double_intermediate // 2, module.act_fn,
                      sub_norm_eps=sub_norm_eps, device="meta", dtype=weight.dtype)
        experts.gate_up_proj = module.gate_up_proj
        experts.down_proj = module.down_proj
        experts.quant_mix = torch.ones((), dtype=torch.float32, device=weight.device)
        if experts.ffn_sub_norm is not None:
            experts.ffn_sub_norm = ExpertRMSNorm(
                num_experts, experts.intermediate_dim, sub_norm_eps
            ).to(device=weight.device, dtype=weight.dtype)
        return experts

    def set_quant_mix(self, mix: float) -> None:
        """Set the warm-up blend between latent (0) and ternary (1) weights."""
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"quantization warm-up mix must be in [0, 1], got {mix}")
        self.quant_mix.fill_(mix)
        self.warming_up = mix < 1.0

    def expert_weights(self, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down) latent weights of one expert: views, each quantized on its own."""
        gate, up = self.gate_up_proj[expert].chunk(2, dim=0)
        return gate, up, self.down_proj[expert]

    def _project(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        gate, up, down = self.expert_weights(expert)
        weight = {"gate": gate, "up": up, "down": down}[name]
        mix = self.quant_mix if self.warming_up else None
        return bitlinear(x, weight, None, mix, self.quantize_input, self.sparsity)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, hidden={self.hidden_dim}, "
            f"intermediate={self.intermediate_dim}, weights=ternary per expert matrix, "
            "activations=int8"
            + (f", q_sparsity={self.sparsity:g}" if self.sparsity else "")
        )
