"""Q-Sparse: per-token top-K activations before the quantized matmul, straight-through."""

import pytest
import torch

from wftool.model.families import FAMILIES
from wftool.model.surgery import convert_to_bitnet
from wftool.quant.bitlinear import BitLinear
from wftool.quant.q_sparse import (
    current_q_sparsity,
    kept_features,
    set_q_sparsity,
    top_k_sparsify,
)
from wftool.quant.ternary import fake_quantize_activations, ternary_weight
from wftool.quant.ternary_linear import TernaryLinear, pack_ternary_layers


def _layer(seed=0, bias=False):
    torch.manual_seed(seed)
    return BitLinear(40, 24, bias=bias)


def test_kept_features_rounds_half_to_even_and_keeps_at_least_one():
    assert kept_features(10, 0.6) == 4
    assert kept_features(5, 0.5) == 3  # round(2.5) = 2 dropped
    assert kept_features(7, 0.5) == 3  # round(3.5) = 4 dropped
    assert kept_features(8, 0.0) == 8
    assert kept_features(32, 0.99) == 1  # round(31.68) = 32 would drop every feature
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            kept_features(8, bad)


def test_top_k_keeps_exactly_k_largest_entries_unchanged():
    x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(0))
    k = kept_features(40, 0.6)
    out = top_k_sparsify(x, 0.6)
    kept = out != 0
    assert (kept.sum(-1) == k).all()
    torch.testing.assert_close(out[kept], x[kept], rtol=0, atol=0)
    # Every kept |x| is at least every dropped one, token by token.
    smallest_kept = x.abs().masked_fill(~kept, float("inf")).amin(-1)
    largest_dropped = x.abs().masked_fill(kept, 0).amax(-1)
    assert (smallest_kept >= largest_dropped).all()


def test_ties_and_zero_rows_still_keep_exactly_k():
    x = torch.tensor([
        [1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0],  # all tied
        [3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.5, 0.0, 0.0, 0.0],  # tie across the cut
        [0.0] * 10,  # nothing to keep but zeros
    ])
    k = kept_features(10, 0.6)
    out = top_k_sparsify(x, 0.6)
    assert (out[:2] != 0).sum(-1).tolist() == [k, k]
    assert out[1, 0] == 3.0 and set(out[1, 1:6].tolist()) <= {0.0, 2.0}
    assert torch.equal(out[2], x[2]) and torch.isfinite(out).all()


def test_gradient_is_straight_through_on_every_entry():
    """The paper's STE: dY/dX = dY/d(X * M), so dropped entries get the gradient too."""
    x = torch.randn(4, 40, requires_grad=True)
    g = torch.randn(4, 40)
    (top_k_sparsify(x, 0.6) * g).sum().backward()
    torch.testing.assert_close(x.grad, g, rtol=0, atol=0)


def test_sparsity_zero_leaves_bitlinear_bit_identical():
    untouched, toggled = _layer(bias=True), _layer(bias=True)
    toggled.sparsity = 0.6
    toggled.sparsity = 0.0
    x = torch.randn(2, 7, 40)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 7, 24)
    out_a, out_b = untouched(xa), toggled(xb)
    assert torch.equal(out_a, out_b)
    out_a.backward(g)
    out_b.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(untouched.weight.grad, toggled.weight.grad)
    assert "q_sparsity" not in repr(toggled)


def test_bitlinear_with_sparsity_matches_manual_reference():
    layer = _layer(bias=True)
    layer.sparsity = 0.6
    x = torch.randn(3, 6, 40, requires_grad=True)
    g = torch.randn(3, 6, 24)
    out = layer(x)
    sparse = top_k_sparsify(x.detach(), 0.6)
    expected = fake_quantize_activations(sparse) @ ternary_weight(layer.weight).T + layer.bias
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    out.backward(g)
    # Input gradient straight through top-K and the quantizer; weight gradient at the
    # sparsified, quantized input that forward used.
    torch.testing.assert_close(x.grad, g @ ternary_weight(layer.weight), rtol=0, atol=1e-5)
    expected_w = g.reshape(-1, 24).T @ fake_quantize_activations(sparse).reshape(-1, 40)
    torch.testing.assert_close(layer.weight.grad, expected_w, rtol=0, atol=1e-5)
    assert (expected_w.abs().sum(0) > 0).all()  # sparsity drops entries, not whole columns
    # The state dict does not change with the setting.
    assert sorted(layer.state_dict()) == ["bias", "weight"]


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_bf16_autocast_forward_backward_keeps_fp32_weight_grads(input_dtype):
    layer = _layer(bias=True)
    layer.sparsity = 0.6
    x = torch.randn(2, 5, 40).to(input_dtype).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.weight.dtype == layer.weight.grad.dtype == torch.float32
    assert layer.bias.grad.dtype == torch.float32
    assert x.grad.dtype == input_dtype and torch.isfinite(x.grad).all()
    # Each token's matmul input has K nonzeros: the dropped columns add nothing.
    reference = fake_quantize_activations(top_k_sparsify(x.detach().float(), 0.6))
    expected = reference @ ternary_weight(layer.weight).T + layer.bias
    assert ((out.float() - expected).norm() / expected.norm()) < 2e-2


def test_set_and_current_round_trip_on_a_converted_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert current_q_sparsity(model) == 0.0  # no quantized layers yet
    convert_to_bitnet(model, FAMILIES["llama"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert current_q_sparsity(model) == 0.0
    set_q_sparsity(model, 0.6)
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert len(layers) == 2 * 7 and all(m.sparsity == 0.6 for m in layers)
    assert current_q_sparsity(model) == 0.6
    assert model.state_dict().keys() == before.keys()
    with pytest.raises(ValueError, match="sparsity"):
        set_q_sparsity(model, 1.0)
    # Packing carries the setting to the served layers; it can be changed there too.
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        trained = model(ids).logits
        pack_ternary_layers(model)
        assert current_q_sparsity(model) == 0.6
        served = model(ids).logits
        assert ((served - trained).norm() / trained.norm()) < 1e-2
        set_q_sparsity(model, 0.0)
    assert all(m.sparsity == 0.0 for m in model.modules() if isinstance(m, TernaryLinear))


@pytest.mark.parametrize("bias", [False, True])
def test_ternary_linear_agrees_with_bitlinear_with_sparsity_on(bias):
    layer = _layer(bias=bias)
    layer.sparsity = 0.6
    packed = TernaryLinear.from_bitlinear(layer)
    assert packed.sparsity == 0.6
    x = torch.randn(3, 7, 40)
    with torch.no_grad():
        expected = layer(x)
    torch.testing.assert_close(packed(x), expected, rtol=1e-5, atol=1e-6)
    dense = TernaryLinear.from_bitlinear(_layer(bias=bias))
    assert not torch.allclose(dense(x), expected, atol=1e-3)  # the setting is what matters
    assert "q_sparsity=0.6" in repr(packed) and "q_sparsity=0.6" in repr(layer)
