import pytest
import torch
from torch import nn

from wftool.quant.bitlinear import BitLinear, RMSNorm, bitlinear
from wftool.quant.ternary import fake_quantize_activations, ternary_weight


def _pair(bias=False):
    torch.manual_seed(0)
    linear = nn.Linear(48, 32, bias=bias)
    return linear, BitLinear.from_linear(linear)


def test_forward_uses_ternary_weights_and_int8_activations():
    linear, layer = _pair(bias=True)
    x = torch.randn(2, 5, 48)
    expected = fake_quantize_activations(x) @ ternary_weight(linear.weight).T + linear.bias
    torch.testing.assert_close(layer(x), expected)
    assert layer.weight is linear.weight  # parameters are shared, not copied


def test_straight_through_gradients_match_linear_on_quantized_values():
    linear, layer = _pair(bias=True)
    x = torch.randn(3, 7, 48, requires_grad=True)
    grad_out = torch.randn(3, 7, 32)
    layer(x).backward(grad_out)
    # STE reference: gradients of a plain linear evaluated at the quantized operands.
    xq = fake_quantize_activations(x).requires_grad_()
    wq = ternary_weight(linear.weight).requires_grad_()
    b = linear.bias.detach().clone().requires_grad_()
    torch.nn.functional.linear(xq, wq, b).backward(grad_out)
    torch.testing.assert_close(x.grad, xq.grad)
    torch.testing.assert_close(layer.weight.grad, wq.grad)
    torch.testing.assert_close(layer.bias.grad, b.grad)


def test_gradcheck_of_ste_is_identity_through_quantizers():
    """d(sum(f(x) * g))/dx equals g @ Wq for every x (no zero gradients from round)."""
    _, layer = _pair()
    x = torch.randn(4, 48, dtype=torch.float32, requires_grad=True)
    g = torch.randn(4, 32)
    (layer(x) * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ ternary_weight(layer.weight))


def test_warmup_mix_blends_latent_and_ternary():
    linear, layer = _pair()
    x = torch.randn(6, 48)
    layer.set_quant_mix(0.25)
    w_eff = linear.weight + 0.25 * (ternary_weight(linear.weight) - linear.weight)
    torch.testing.assert_close(layer(x), fake_quantize_activations(x) @ w_eff.T)
    layer.set_quant_mix(1.0)
    assert not layer.warming_up
    with pytest.raises(ValueError):
        layer.set_quant_mix(1.5)


def test_owned_input_norm_is_saved_and_applied():
    linear = nn.Linear(16, 8, bias=False)
    layer = BitLinear.from_linear(linear, input_norm_eps=1e-8)
    assert "input_norm.weight" in layer.state_dict()
    x = torch.randn(3, 16)
    normed = RMSNorm(16, 1e-8)(x)
    torch.testing.assert_close(layer(x), bitlinear(normed, linear.weight))


def test_shared_sub_norm_is_applied_but_not_registered_twice():
    parent = nn.Module()
    parent.proj = BitLinear(16, 8)
    parent.sub_norm = RMSNorm(16)
    parent.sub_norm.weight.data.uniform_(0.5, 2.0)
    parent.proj.use_sub_norm(parent.sub_norm)
    assert sorted(parent.state_dict()) == ["proj.weight", "sub_norm.weight"]
    x = torch.randn(2, 16)
    torch.testing.assert_close(parent.proj(x), bitlinear(parent.sub_norm(x), parent.proj.weight))
    # A deep copy shares the copied norm, not the original.
    import copy

    clone = copy.deepcopy(parent)
    assert clone.proj.input_norm is clone.sub_norm


def test_compiled_matches_eager():
    _, layer = _pair()
    x = torch.randn(4, 48)
    compiled = torch.compile(layer)
    torch.testing.assert_close(compiled(x), layer(x))


def test_float_activations_keep_ternary_weights_only():
    from wftool.model.surgery import float_activations

    linear, layer = _pair()
    holder = torch.nn.Sequential(layer)
    x = torch.randn(3, 48)
    with float_activations(holder):
        torch.testing.assert_close(layer(x), x @ ternary_weight(linear.weight).T)
    expected = fake_quantize_activations(x) @ ternary_weight(linear.weight).T
    torch.testing.assert_close(layer(x), expected)
