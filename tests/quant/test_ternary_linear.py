"""TernaryLinear: the served layer computes BitLinear's forward from int8 codes alone."""

import copy

import pytest
import torch

from tests.conftest import tiny_qwen3
from wftool.errors import WftError
from wftool.model.families import FAMILIES
from wftool.model.surgery import convert_to_bitnet, set_quant_mix
from wftool.quant.bitlinear import BitLinear, RMSNorm
from wftool.quant.ternary import quantize_activations, ternarize
from wftool.quant.ternary_linear import TernaryLinear, pack_ternary_layers


def _bitlinear(bias=False, norm=None):
    torch.manual_seed(0)
    layer = BitLinear(96, 48, bias=bias, input_norm_eps=1e-6 if norm == "owned" else None)
    if norm == "shared":
        shared = RMSNorm(96)
        shared.weight.data.uniform_(0.5, 1.5)
        layer.use_sub_norm(shared)
    return layer


@pytest.mark.parametrize("bias,norm", [(False, None), (True, None), (False, "owned"),
                                       (False, "shared")])
def test_ternary_linear_matches_bitlinear(bias, norm):
    layer = _bitlinear(bias, norm)
    packed = TernaryLinear.from_bitlinear(layer)
    x = torch.randn(3, 7, 96)
    with torch.no_grad():
        expected = layer(x)
    assert torch.allclose(packed(x), expected, rtol=1e-5, atol=1e-6)
    assert packed.codes.dtype == torch.int8 and set(packed.codes.unique().tolist()) <= {-1, 0, 1}
    # A shared sub-norm stays the block's: it is not saved twice under the layer.
    assert ("input_norm.weight" in packed.state_dict()) == (norm == "owned")


def test_ternary_linear_is_the_exact_integer_product():
    layer = _bitlinear()
    packed = TernaryLinear.from_bitlinear(layer)
    x = torch.randn(5, 96) * 3
    codes, delta = ternarize(layer.weight)
    act = quantize_activations(x)
    exact = (act.codes.double() @ codes.double().T) * act.scale.double() * delta.double()
    assert torch.allclose(packed(x).double(), exact, rtol=1e-6, atol=1e-7)


def test_packing_a_qwen3_student_frees_latent_weights_and_keeps_its_logits():
    model = tiny_qwen3()
    convert_to_bitnet(model, FAMILIES["qwen3"])
    packed = copy.deepcopy(model)
    assert pack_ternary_layers(packed) == 2 * 7
    assert not any(isinstance(m, BitLinear) for m in packed.modules())
    float_weights = [n for n, p in packed.named_parameters() if p.dim() == 2]
    assert float_weights == ["model.embed_tokens.weight", "lm_head.weight"]
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(ids).logits, packed(ids).logits
    # Equal up to float rounding, which can flip an activation code now and then.
    assert ((got - expected).norm() / expected.norm()) < 1e-2
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95


def test_packing_refuses_an_unfinished_warm_up():
    model = tiny_qwen3()
    convert_to_bitnet(model, FAMILIES["qwen3"])
    set_quant_mix(model, 0.5)
    with pytest.raises(WftError, match="warm-up is unfinished"):
        pack_ternary_layers(model)
