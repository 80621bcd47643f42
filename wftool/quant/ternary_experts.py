"""TernaryExperts: the served form of BitExperts, int8 codes and one delta per expert matrix.

A trained BitExperts holds fp32 latent `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]
and ternarizes each expert's gate, up and down matrix on its own in every forward.
TernaryExperts keeps only what that forward reads: `ternarize` of each expert matrix, codes
as int8 ([E, I, H] gate, [E, I, H] up, [E, H, I] down, a quarter of the fp32 memory) and
deltas as fp32 [E] per matrix. It runs the same routing loop and computes each projection
with TernaryLinear's integer product (`ternary_product`), so a packed MoE student gives the
trained student's logits. The per-expert SubLN and the Q-Sparse `sparsity` come along.
"""

from __future__ import annotations

import torch
from torch import nn

from wftool.quant.bit_experts import BitExperts, ExpertRMSNorm, RoutedExperts
from wftool.quant.ternary import ternarize
from wftool.quant.ternary_linear import refuse_unfinished_warm_up, ternary_product


def _stacked_ternary(weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternarize each expert's matrix on its own: (int8 codes [E, ...], fp32 deltas [E])."""
    packed = [ternarize(weight) for weight in weights]
    codes = torch.stack([p.codes for p in packed]).contiguous()
    return codes, torch.stack([p.delta for p in packed])


class TernaryExperts(RoutedExperts):
    """Routed experts computed from int8 ternary codes: same inputs, outputs and routing as
    BitExperts, no latent weights. `sparsity` is a plain float, outside the state dict."""

    def __init__(
        self,
        gate: tuple[torch.Tensor, torch.Tensor],
        up: tuple[torch.Tensor, torch.Tensor],
        down: tuple[torch.Tensor, torch.Tensor],
        act_fn: nn.Module,
        ffn_sub_norm: ExpertRMSNorm | None = None,
        sparsity: float = 0.0,
    ):
        """`gate`, `up`, `down`: (codes [E, out, in], deltas [E]) for each expert matrix."""
        super().__init__()
        self.num_experts, self.intermediate_dim, self.hidden_dim = gate[0].shape
        for name, (codes, delta) in {"gate": gate, "up": up, "down": down}.items():
            self.register_buffer(f"{name}_codes", codes.to(torch.int8).contiguous())
            self.register_buffer(f"{name}_delta", delta.detach().float().reshape(-1))
        self.act_fn = act_fn
        self.ffn_sub_norm = ffn_sub_norm
        self.sparsity = sparsity

    @classmethod
    def from_bit_experts(cls, module: BitExperts) -> TernaryExperts:
        """The packed form of a trained BitExperts (refused while it is warming up)."""
        refuse_unfinished_warm_up(module)
        per_expert = [module.expert_weights(e) for e in range(module.num_experts)]
        gate, up, down = (_stacked_ternary(list(matrices)) for matrices in zip(*per_expert))
        return cls(gate, up, down, module.act_fn, module.ffn_sub_norm, module.sparsity)

    def _project(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        codes = getattr(self, f"{name}_codes")[expert]
        delta = getattr(self, f"{name}_delta")[expert]
        return ternary_product(x, codes, delta, self.sparsity).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, hidden={self.hidden_dim}, "
            f"intermediate={self.intermediate_dim}, weights=int8 ternary codes per expert "
            "matrix" + (f", q_sparsity={self.sparsity:g}" if self.sparsity else "")
        )
