"""BitLinear: a drop-in nn.Linear whose forward sees ternary weights and int8 activations.

Latent weights stay full precision and are what the optimizer updates; gradients pass
straight through the quantizers (STE). The custom autograd function keeps backward as cheap
as nn.Linear's: it saves the quantized input and the latent weight (not a second, quantized
copy of the weight, which FSDP could not free between forward and backward).
With Q-Sparse on (`sparsity` > 0) each token keeps only its top-K |x| before quantization;
the input gradient stays straight through, so backward is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wftool.quant.q_sparse import sparsify_top_k
from wftool.quant.ternary import fake_quantize_activations, ternary_weight


def _effective_weight(weight: torch.Tensor, mix: torch.Tensor | None) -> torch.Tensor:
    quantized = ternary_weight(weight)
    if mix is None:
        return quantized
    # Quantization warm-up: W + mix * (Wq - W), mix ramping 0 -> 1.
    return torch.lerp(weight.detach(), quantized, mix.to(weight.dtype))


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on (bf16 on GPUs), else the wider input."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(x.dtype, weight.dtype)


class _BitLinearFunction(torch.autograd.Function):
    """Forward in the compute dtype, gradients in each input's own dtype.

    Under autocast the matmuls run in bf16 like nn.Linear's, but casts are explicit (autocast
    is switched off inside), so backward never mixes a bf16 gradient with an fp32 weight and
    the latent weight's gradient comes back in fp32, the master weights' dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mix, quantize_input=True, sparsity=0.0):
        dtype = _compute_dtype(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            if sparsity:
                x = sparsify_top_k(x, sparsity)
            x_q = (fake_quantize_activations(x) if quantize_input else x).to(dtype)
            w_q = _effective_weight(weight, mix).to(dtype)
            out = F.linear(x_q, w_q, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(x_q, weight, mix)
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x_q, weight, mix = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        with torch.autocast(grad_out.device.type, enabled=False):
            flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
            if ctx.needs_input_grad[0]:
                # Straight-through (through top-K too): d out / d x = W_q, recomputed
                # rather than kept alive.
                w_q = _effective_weight(weight, mix).to(grad_out.dtype)
                grad_x = (grad_out @ w_q).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                flat_x = x_q.reshape(-1, x_q.shape[-1]).to(grad_out.dtype)
                grad_w = (flat_grad.T @ flat_x).to(weight.dtype)
            if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
                grad_b = flat_grad.float().sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None, None, None


def bitlinear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    mix: torch.Tensor | None = None,
    quantize_input: bool = True,
    sparsity: float = 0.0,
) -> torch.Tensor:
    """Functional BitLinear: linear(absmax_int8(x), absmean_ternary(W)) with STE gradients.
    `quantize_input=False` keeps activations in floating point (what llama.cpp computes for
    F16 exports), for comparisons only. `sparsity` > 0 first keeps each token's top-K |x|
    (Q-Sparse, see wftool.quant.q_sparse), also with a straight-through gradient."""
    return _BitLinearFunction.apply(x, weight, bias, mix, quantize_input, sparsity)


class RMSNorm(nn.Module):
    """Weight-only RMSNorm (the norm SubLN inserts; starts at weight 1)."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class BitLinear(nn.Linear):
    """nn.Linear with BitNet b1.58 fake quantization in forward.

    ``input_norm`` is an optional RMSNorm applied to the input first. It is either owned
    (the "all" SubLN placement: one norm per projection, saved as ``<proj>.input_norm``) or
    shared from the parent block via :meth:`use_sub_norm` (the paper placement, where the
    norm lives at a flat name such as ``self_attn.attn_sub_norm`` as llama.cpp expects).

    ``sparsity`` is the Q-Sparse share of each token's features dropped before quantization
    (0.0, the default, is off). A plain float, not a buffer, so state dicts do not change;
    set it model-wide with :func:`wftool.quant.q_sparse.set_q_sparsity`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        input_norm_eps: float | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.input_norm = RMSNorm(in_features, input_norm_eps) if input_norm_eps else None
        # Warm-up mix as a buffer, so ramping it does not recompile a compiled model.
        self.register_buffer("quant_mix", torch.ones((), dtype=torch.float32), persistent=False)
        self.warming_up = False
        self.quantize_input = True
        self.sparsity = 0.0

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, input_norm_eps: float | None = None) -> BitLinear:
        """A BitLinear that takes over ``linear``'s parameters (no copy)."""
        weight = linear.weight
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta"
        )
        layer.weight = weight
        layer.bias = linear.bias
        layer.quant_mix = torch.ones((), dtype=torch.float32, device=weight.device)
        layer.quantize_input = True
        if input_norm_eps:
            layer.input_norm = RMSNorm(linear.in_features, input_norm_eps).to(
                device=weight.device, dtype=weight.dtype
            )
        return layer

    def use_sub_norm(self, norm: nn.Module) -> None:
        """Apply ``norm`` (registered on the parent block) to this layer's input."""
        if self._modules.get("input_norm") is not None:
            raise ValueError("this BitLinear already owns an input norm")
        self._modules.pop("input_norm", None)
        # Bypass nn.Module.__setattr__ so the norm is not registered (and saved) twice.
        object.__setattr__(self, "input_norm", norm)

    def set_quant_mix(self, mix: float) -> None:
        """Set the warm-up blend between latent (0) and ternary (1) weights."""
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"quantization warm-up mix must be in [0, 1], got {mix}")
        self.quant_mix.fill_(mix)
        self.warming_up = mix < 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm is not None:
            x = self.input_norm(x)
        mix = self.quant_mix if self.warming_up else None
        return bitlinear(x, self.weight, self.bias, mix, self.quantize_input, self.sparsity)

    def extra_repr(self) -> str:
        shared = self.input_norm is not None and "input_norm" not in self._modules
        return (
            super().extra_repr()
            + ", weights=ternary, activations=int8"
            + (f", q_sparsity={self.sparsity:g}" if self.sparsity else "")
            + (", input_norm=shared sub-norm" if shared else "")
        )
