"""BitNet b1.58 quantization math: the one copy used by training, export and serving.

Weights are quantized per tensor to delta x {-1, 0, +1} with delta = mean(|W|) (absmean);
activations per token to int8 with scale max(|x|) / 127 (absmax). Rounding is torch's
round-half-to-even everywhere, so training, export and serving agree bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Floors from BitNet b1.58: keep an all-zero tensor or token from dividing by zero.
WEIGHT_SCALE_MIN = 1e-5
ACTIVATION_SCALE_MIN = 1e-5
ACTIVATION_LEVELS = 127  # symmetric int8: codes in [-128, 127], scale absmax / 127


class TernaryWeight(NamedTuple):
    codes: torch.Tensor  # int8, values in {-1, 0, 1}, same shape as the weight
    delta: torch.Tensor  # float32 scalar: the per-tensor scale


class QuantizedActivations(NamedTuple):
    codes: torch.Tensor  # int8, values in [-128, 127]
    scale: torch.Tensor  # float32, shape [..., 1]: x ~= codes * scale


def weight_delta(weight: torch.Tensor) -> torch.Tensor:
    """Per-tensor absmean scale, float32 whatever the weight dtype."""
    # abs().sum() rather than vector_norm(ord=1): the latter drifts by ~1e-6 in float32.
    w = weight.detach().float()
    return (w.abs().sum() / w.numel()).clamp_(min=WEIGHT_SCALE_MIN)


def _ternary_codes(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """round(W / delta) clipped to {-1, 0, 1}, as float32."""
    return torch.div(weight.detach().float(), delta).round_().clamp_(-1, 1)


def ternarize(weight: torch.Tensor) -> TernaryWeight:
    """Quantize a weight to int8 codes in {-1, 0, 1} and its float32 per-tensor delta."""
    delta = weight_delta(weight)
    return TernaryWeight(_ternary_codes(weight, delta).to(torch.int8), delta)


def ternary_weight(weight: torch.Tensor) -> torch.Tensor:
    """The dequantized weight delta x codes in the weight's dtype, detached."""
    delta = weight_delta(weight)
    return _ternary_codes(weight, delta).mul_(delta).to(weight.dtype)


def _activation_absmax(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().float()
    return torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True).clamp_(
        min=ACTIVATION_SCALE_MIN
    )


def _activation_codes(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """round(127 x / absmax) clipped to int8 range, as float32."""
    return torch.mul(x.detach().float(), ACTIVATION_LEVELS / absmax).round_().clamp_(-128, 127)


def quantize_activations(x: torch.Tensor) -> QuantizedActivations:
    """Per-token (last dim) absmax int8 quantization: x ~= codes * scale."""
    absmax = _activation_absmax(x)
    return QuantizedActivations(
        _activation_codes(x, absmax).to(torch.int8), absmax / ACTIVATION_LEVELS
    )


def fake_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Quantize then dequantize activations, in their own dtype, detached."""
    absmax = _activation_absmax(x)
    return _activation_codes(x, absmax).mul_(absmax / ACTIVATION_LEVELS).to(x.dtype)
