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


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_trains_with_fp32_master_weights(bias, input_dtype):
    """What every GPU run does: fp32 latent weights, bf16 compute under autocast. Forward
    and backward run in bf16 like nn.Linear's, gradients come back in each input's dtype,
    and they are the STE gradients of a bf16 linear on the quantized operands."""
    linear, layer = _pair(bias=bias)
    x = torch.randn(3, 7, 48).to(input_dtype).requires_grad_()
    grad_out = torch.randn(3, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().backward(grad_out)
    assert layer.weight.dtype == layer.weight.grad.dtype == torch.float32
    assert x.grad.dtype == input_dtype
    # Reference in bf16: the same quantized operands through a plain linear.
    xq = fake_quantize_activations(x.detach()).to(torch.bfloat16).requires_grad_()
    wq = ternary_weight(linear.weight).to(torch.bfloat16).requires_grad_()
    b = None if not bias else linear.bias.detach().to(torch.bfloat16).requires_grad_()
    expected = torch.nn.functional.linear(xq, wq, b)
    expected.float().backward(grad_out)
    # Same bf16 operands; only the accumulation order of the matmul may differ.
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.float(), xq.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer.weight.grad, wq.grad.float(), rtol=2e-2, atol=5e-2)
    if bias:
        assert layer.bias.grad.dtype == torch.float32
        torch.testing.assert_close(layer.bias.grad, grad_out.sum((0, 1)), rtol=1e-2, atol=1e-2)
    # And close to the fp32 computation (bf16 keeps ~3 significant digits).
    fp32 = layer(x.detach().float())
    rel = (out.float() - fp32).norm() / fp32.norm()
    assert rel < 2e-2


def test_bf16_grad_is_not_lost_on_fp32_master_weights():
    """A small step on fp32 masters moves (nearly) every weight; on bf16 weights most
    entries would round back to themselves (the reason masters stay fp32)."""
    _, layer = _pair()
    before = layer.weight.detach().clone()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=5e-5, weight_decay=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(16, 48))
    out.float().pow(2).mean().backward()
    optimizer.step()
    moved = (layer.weight.detach() != before).float().mean()
    assert moved > 0.95
    as_bf16 = before.to(torch.bfloat16)
    stepped = (as_bf16.float() - 5e-5 * torch.sign(layer.weight.grad)).to(torch.bfloat16)
    assert (stepped != as_bf16).float().mean() < 0.8  # why bf16 masters stall
