"""Inference-only ternary layers: int8 codes and one delta instead of latent weights.

`TernaryLinear` keeps what an exported model keeps, `ternarize(W)` (codes in {-1, 0, 1} as
int8, a quarter of the fp32 latent weight's memory, and the fp32 delta), and computes the
BitNet b1.58 product in integers: int8 activation codes x int8 weight codes accumulated in
int32 (exact), then scaled by activation scale x delta. `pack_ternary_layers` swaps every
BitLinear of a trained model for one, and every BitExperts for a TernaryExperts (the same
product per expert matrix, see wftool.quant.ternary_experts), freeing the latent weights. A
Q-Sparse student's `sparsity` comes along, so the served layer keeps the same top-K
activations it trained with.

Codes stay int8 rather than 2-bit packed in memory: unpacking 2-bit codes before every
matmul costs ~10x the integer matmul itself on CPU (see bench/serve.py), while int8 codes
feed torch's integer matmul directly.
"""

from __future__ import annotations

import torch
from torch import nn

from wftool.errors import WftError
from wftool.quant.bitlinear import BitLinear
from wftool.quant.q_sparse import sparsify_top_k
from wftool.quant.ternary import quantize_activations, ternarize


def _integer_matmul(x_codes: torch.Tensor, w_codes_t: torch.Tensor) -> torch.Tensor:
    """int8 [T, in] x int8 [in, out] -> exact product as float32."""
    if x_codes.device.type == "cpu":
        return torch._int_mm(x_codes, w_codes_t).float()
    # GPU int8 kernels need T > 16 and multiples of 8; float32 holds these sums exactly
    # (|sum| <= 128 * in_features < 2^24 for any real layer width).
    return x_codes.float() @ w_codes_t.float()


def ternary_product(x: torch.Tensor, codes: torch.Tensor, delta: torch.Tensor,
                    sparsity: float = 0.0) -> torch.Tensor:
    """BitLinear's product from int8 codes: x [T, in], codes int8 [out, in] -> float32
    [T, out] = (int8(x) @ codes^T) * scale_x * delta, after Q-Sparse top-K when sparsity > 0."""
    if sparsity:
        x = sparsify_top_k(x, sparsity)
    quantized = quantize_activations(x)
    return _integer_matmul(quantized.codes, codes.t()) * (quantized.scale * delta)


def refuse_unfinished_warm_up(module: nn.Module) -> None:
    """Raise unless `module` (a BitLinear or BitExperts) has finished its quantization
    warm-up: before that its latent weights are not the ternary ones codes would keep."""
    if module.warming_up:
        raise WftError(
            f"quantization warm-up is unfinished (mix {module.quant_mix.item():.3f} < 1): "
            "the latent weights are not yet the ternary ones",
            "serve the checkpoint a finished stage wrote (runs/<name>/<stage>/final)",
        )


class TernaryLinear(nn.Module):
    """y = (codes_x @ codes_W^T) * scale_x * delta + bias, with the input norm first (and
    Q-Sparse top-K of x next, when `sparsity` > 0; a plain float, outside the state dict)."""

    def __init__(self, codes: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor | None,
                 input_norm: nn.Module | None = None, owns_norm: bool = True,
                 sparsity: float = 0.0):
        super().__init__()
        self.sparsity = sparsity
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes.to(torch.int8).contiguous())
        self.register_buffer("delta", delta.detach().float().reshape(()))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        if input_norm is None or owns_norm:
            self.input_norm = input_norm
        else:  # a shared sub-norm stays registered on its block only, as in BitLinear
            object.__setattr__(self, "input_norm", input_norm)

    @classmethod
    def from_bitlinear(cls, layer: BitLinear) -> TernaryLinear:
        """The packed form of a trained BitLinear (refused while it is warming up)."""
        refuse_unfinished_warm_up(layer)
        codes, delta = ternarize(layer.weight)
        owns = "input_norm" in layer._modules
        return cls(codes, delta, layer.bias, layer.input_norm, owns_norm=owns,
                   sparsity=layer.sparsity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm is not None:
            x = self.input_norm(x)
        shape = x.shape
        out = ternary_product(x.reshape(-1, self.in_features), self.codes, self.delta,
                              self.sparsity)
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weights=int8 ternary codes"
                + (f", q_sparsity={self.sparsity:g}" if self.sparsity else ""))


@torch.no_grad()
def pack_ternary_layers(model: nn.Module) -> int:
    """Replace every BitLinear in `model` by a TernaryLinear and every BitExperts by a
    TernaryExperts, in place; returns how many modules were replaced."""
    # Imported here: ternary_experts imports this module for the product above.
    from wftool.quant.bit_experts import BitExperts
    from wftool.quant.ternary_experts import TernaryExperts

    replaced = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, BitLinear):
                setattr(module, child_name, TernaryLinear.from_bitlinear(child))
            elif isinstance(child, BitExperts):
                setattr(module, child_name, TernaryExperts.from_bit_experts(child))
            else:
                continue
            replaced += 1
    return replaced
