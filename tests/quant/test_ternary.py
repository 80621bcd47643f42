"""The quantizer against a float64 closed-form reference (METHOD.md section 1)."""

import numpy as np
import pytest
import torch

from wftool.quant.ternary import (
    fake_quantize_activations,
    quantize_activations,
    ternarize,
    ternary_weight,
)


def reference_ternary(w: np.ndarray):
    w = w.astype(np.float64)
    delta = max(np.abs(w).mean(), 1e-5)
    return np.clip(np.round(w / delta), -1, 1), delta  # np.round is half-to-even too


def reference_activations(x: np.ndarray):
    x = x.astype(np.float64)
    g = np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-5)
    return np.clip(np.round(127 * x / g), -128, 127), g / 127


def _near_tie(value: np.ndarray, tol: float = 1e-4) -> np.ndarray:
    """Where float32 rounding may legitimately land on the other side of a .5 boundary."""
    return np.abs(np.abs(value - np.floor(value)) - 0.5) < tol


@pytest.mark.parametrize("shape", [(64, 256), (7, 13), (1, 1)])
def test_ternarize_matches_closed_form(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.02
    codes, delta = ternarize(w)
    ref_codes, ref_delta = reference_ternary(w.numpy())
    assert codes.dtype == torch.int8
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    assert delta.dtype == torch.float32 and delta.ndim == 0
    assert delta.item() == pytest.approx(ref_delta, rel=1e-6)
    ratio = w.numpy().astype(np.float64) / ref_delta
    differs = codes.numpy() != ref_codes
    assert not (differs & ~_near_tie(ratio)).any()
    torch.testing.assert_close(ternary_weight(w), codes.float() * delta)


def test_ternarize_all_zero_uses_floor():
    codes, delta = ternarize(torch.zeros(4, 8))
    assert delta.item() == pytest.approx(1e-5)
    assert torch.count_nonzero(codes) == 0
    assert torch.count_nonzero(ternary_weight(torch.zeros(4, 8))) == 0


def test_ternarize_outlier_dominates_scale():
    w = torch.full((16, 16), 0.01)
    w[0, 0] = 1000.0
    codes, delta = ternarize(w)
    assert delta.item() == pytest.approx((1000.0 + 255 * 0.01) / 256, rel=1e-6)
    # Every small weight rounds to zero; only the outlier survives, clipped to +1.
    assert codes[0, 0] == 1 and torch.count_nonzero(codes) == 1


def test_ternarize_bf16_input_computes_in_float32():
    w32 = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    w16 = w32.bfloat16()
    codes, delta = ternarize(w16)
    ref_codes, ref_delta = reference_ternary(w16.float().numpy())
    assert delta.dtype == torch.float32
    assert delta.item() == pytest.approx(ref_delta, rel=1e-6)
    ratio = w16.float().numpy().astype(np.float64) / ref_delta
    assert not ((codes.numpy() != ref_codes) & ~_near_tie(ratio)).any()
    assert ternary_weight(w16).dtype == torch.bfloat16


@pytest.mark.parametrize("scale", [1.0, 1e-3, 50.0])
def test_activation_quantization_matches_closed_form(scale):
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(3)) * scale
    codes, step = quantize_activations(x)
    ref_codes, ref_step = reference_activations(x.numpy())
    assert codes.dtype == torch.int8 and step.shape == (3, 5, 1)
    np.testing.assert_allclose(step.numpy(), ref_step, rtol=1e-6)
    exact = x.numpy().astype(np.float64) * 127 / (ref_step * 127)
    assert not ((codes.numpy() != ref_codes) & ~_near_tie(exact)).any()
    # The per-token maximum maps to exactly +-127.
    assert codes.abs().amax(-1).eq(127).all()
    torch.testing.assert_close(fake_quantize_activations(x), codes.float() * step)


def test_activation_zero_token_and_outlier():
    x = torch.randn(3, 64)
    x[0] = 0.0
    x[1, 7] = 1e6
    codes, step = quantize_activations(x)
    assert torch.count_nonzero(codes[0]) == 0 and step[0].item() == pytest.approx(1e-5 / 127)
    assert codes[1, 7] == 127 and torch.count_nonzero(codes[1]) == 1
    assert not torch.isnan(fake_quantize_activations(x)).any()


def test_activation_bf16_keeps_dtype():
    x = torch.randn(4, 32).bfloat16()
    out = fake_quantize_activations(x)
    assert out.dtype == torch.bfloat16
    codes, step = quantize_activations(x)
    torch.testing.assert_close(out.float(), (codes.float() * step).bfloat16().float())


def test_round_half_to_even():
    # delta = mean(|w|) = 1, so w / delta hits .5 exactly: 0.5 -> 0, 1.5 -> 2 -> clipped 1.
    w = torch.tensor([[0.5, -0.5, 1.5, 1.0, 1.5, 1.0]])
    assert w.abs().mean().item() == 1.0
    codes, _ = ternarize(w)
    assert codes.tolist() == [[0, 0, 1, 1, 1, 1]]
