"""Q-Sparse (arXiv 2407.10969): per-token top-K sparsification of activations.

Before a quantized matmul, each token keeps only its K largest-magnitude features and the
rest become zero, so the product touches K of the weight's columns. `sparsity` is the share
dropped: K = features - round(sparsity * features), at least 1. The paper quantizes the
sparsified activations; with per-token absmax scaling the order does not matter anyway,
because the largest |x| is always kept and so the scale is unchanged.

Off by default (sparsity 0). A model's layers carry it as a plain float attribute, so state
dicts are unchanged; `set_q_sparsity` / `current_q_sparsity` set and read it model-wide.
"""

from __future__ import annotations

import torch
from torch import nn


def kept_features(features: int, sparsity: float) -> int:
    """K: how many of `features` entries per token survive at `sparsity` (at least one)."""
    check_sparsity(sparsity)
    # Python's round is half-to-even, like torch's everywhere else in the quantizer.
    return max(1, features - round(sparsity * features))


def check_sparsity(sparsity: float) -> None:
    """Refuse a sparsity outside [0, 1): 0 is off, 1 would drop every feature."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"Q-Sparse sparsity must be in [0, 1) (0 = off), got {sparsity}")


def sparsify_top_k(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero all but the K largest-|x| entries of each token (last dim), detached.

    Selection is by topk indices, not a threshold, so ties still keep exactly K entries
    (which of the tied ones is torch's choice). Kept entries keep their exact values.
    """
    features = x.shape[-1]
    k = kept_features(features, sparsity)
    x = x.detach()
    if k == features:
        return x
    kept = x.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter_(-1, kept, x.gather(-1, kept))


class _TopKStraightThrough(torch.autograd.Function):
    """Top-K forward, identity backward: Q-Sparse's straight-through estimator."""

    @staticmethod
    def forward(ctx, x, sparsity):
        return sparsify_top_k(x, sparsity)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, None


def top_k_sparsify(x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-token top-K sparsification with the paper's straight-through gradient.

    Forward: `sparsify_top_k(x, sparsity)`. Backward: the identity on every entry, dropped
    ones included (the paper's STE passes the gradient through top-K "without being
    masked", dY/dX = dY/d(X * M); masking it instead starves the lower layers of gradient,
    the vanishing-gradient problem its Figure 2 shows).
    """
    return _TopKStraightThrough.apply(x, sparsity)


def _sparse_layers(model: nn.Module) -> list[nn.Module]:
    # Imported here: both layer modules import this one for the math above.
    from wftool.quant.bit_experts import BitExperts
    from wftool.quant.bitlinear import BitLinear
    from wftool.quant.ternary_experts import TernaryExperts
    from wftool.quant.ternary_linear import TernaryLinear

    kinds = (BitLinear, BitExperts, TernaryLinear, TernaryExperts)
    return [m for m in model.modules() if isinstance(m, kinds)]


def set_q_sparsity(model: nn.Module, sparsity: float) -> None:
    """Set the Q-Sparse sparsity on every BitLinear, BitExperts and TernaryLinear (0 = off)."""
    check_sparsity(sparsity)
    for layer in _sparse_layers(model):
        layer.sparsity = float(sparsity)


def current_q_sparsity(model: nn.Module) -> float:
    """The sparsity the model's quantized layers use (0.0 for a model without any)."""
    for layer in _sparse_layers(model):
        return layer.sparsity
    return 0.0
