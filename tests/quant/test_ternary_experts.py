"""TernaryExperts: a served MoE student computes its routed experts from int8 codes alone."""

import copy

import pytest
import torch

from tests.model.test_moe import tiny_mixtral
from wftool.errors import WftError
from wftool.model.families import FAMILIES
from wftool.model.surgery import convert_to_bitnet, set_quant_mix
from wftool.quant.bit_experts import BitExperts, ExpertRMSNorm
from wftool.quant.bitlinear import RMSNorm
from wftool.quant.q_sparse import set_q_sparsity
from wftool.quant.ternary import ternarize
from wftool.quant.ternary_experts import TernaryExperts
from wftool.quant.ternary_linear import TernaryLinear, pack_ternary_layers

TOKENS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _student(sub_norm="paper", sparsity=0.0):
    model = tiny_mixtral()
    convert_to_bitnet(model, FAMILIES["mixtral"], sub_norm)
    for module in model.modules():  # non-trivial sub-norms, so skipping one shows
        if isinstance(module, (RMSNorm, ExpertRMSNorm)):
            module.weight.data.uniform_(0.5, 1.5)
    set_q_sparsity(model, sparsity)
    return model


def _packed(model):
    packed = copy.deepcopy(model)
    # 2 layers x (q, k, v, o BitLinear + one BitExperts); routers stay nn.Linear.
    assert pack_ternary_layers(packed) == 2 * 5
    return packed


def _experts(model, kind):
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


def _experts_io(model):
    """Each experts module's (hidden, top_k_index, top_k_weights) inputs in one forward."""
    seen = {}
    handles = [m.register_forward_hook(lambda m, args, out, n=n: seen.__setitem__(n, args))
               for n, m in _experts(model, BitExperts).items()]
    with torch.no_grad():
        model(TOKENS)
    for handle in handles:
        handle.remove()
    return seen


def _assert_logits_agree(model, packed):
    with torch.no_grad():
        expected, got = model(TOKENS).logits, packed(TOKENS).logits
    # Equal up to float rounding, which can flip an activation code now and then.
    assert ((got - expected).norm() / expected.norm()) < 1e-2
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.95


def _assert_experts_agree(model, packed):
    """Same inputs, same outputs, expert module by expert module."""
    for name, args in _experts_io(model).items():
        with torch.no_grad():
            expected = model.get_submodule(name)(*args)
            got = packed.get_submodule(name)(*args)
        # Float rounding may flip one activation code before down_proj on another CPU,
        # which moves that token's output: nearly every value agrees to rounding.
        close = torch.isclose(got, expected, rtol=1e-5, atol=1e-6)
        assert close.float().mean() > 0.99, name
        assert (got - expected).norm() / expected.norm() < 1e-2, name


@pytest.mark.parametrize("sub_norm", ["paper", "none"])
def test_packed_mixtral_student_keeps_its_experts_outputs_and_logits(sub_norm):
    model = _student(sub_norm)
    packed = _packed(model)
    assert not _experts(packed, BitExperts)
    served = _experts(packed, TernaryExperts)
    assert sorted(served) == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert all((e.ffn_sub_norm is None) == (sub_norm == "none") for e in served.values())
    _assert_experts_agree(model, packed)
    _assert_logits_agree(model, packed)


def test_packed_experts_hold_int8_codes_per_expert_matrix_and_no_float_weights():
    model = _student()
    packed = _packed(model)
    for name, served in _experts(packed, TernaryExperts).items():
        trained = model.get_submodule(name)
        assert (served.gate_codes.shape, served.up_codes.shape, served.down_codes.shape) == (
            (4, 128, 64), (4, 128, 64), (4, 64, 128))
        for expert in range(4):
            for matrix, weight in zip(("gate", "up", "down"), trained.expert_weights(expert)):
                codes, delta = ternarize(weight)
                assert torch.equal(getattr(served, f"{matrix}_codes")[expert], codes)
                assert getattr(served, f"{matrix}_delta")[expert] == delta
        assert all(getattr(served, f"{m}_codes").dtype == torch.int8
                   for m in ("gate", "up", "down"))
        # The only float parameters left are the per-expert SubLN weights.
        assert [n for n, _ in served.named_parameters()] == ["ffn_sub_norm.weight"]
    float_weights = [n for n, p in packed.named_parameters() if p.dim() >= 2
                     and not n.endswith("ffn_sub_norm.weight")]
    routers = [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    assert sorted(float_weights) == sorted(
        ["model.embed_tokens.weight", "lm_head.weight", *routers])


def _bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def test_packing_shrinks_the_experts_to_a_quarter():
    model = _student()
    packed = _packed(model)
    for name, served in _experts(packed, TernaryExperts).items():
        trained = model.get_submodule(name)
        latent = _bytes([trained.gate_up_proj, trained.down_proj])
        codes = _bytes([served.gate_codes, served.up_codes, served.down_codes])
        deltas = _bytes([served.gate_delta, served.up_delta, served.down_delta])
        # int8 codes for fp32 latents, plus one fp32 delta per expert matrix.
        assert codes == latent // 4 and deltas == 3 * 4 * 4
    whole = [*model.parameters(), *model.buffers()]
    assert _bytes([*packed.parameters(), *packed.buffers()]) < _bytes(whole)


def test_warming_up_experts_are_refused():
    model = _student()
    set_quant_mix(model, 0.5)
    experts = next(iter(_experts(model, BitExperts).values()))
    with pytest.raises(WftError, match="warm-up is unfinished"):
        TernaryExperts.from_bit_experts(experts)
    with pytest.raises(WftError, match="warm-up is unfinished"):
        pack_ternary_layers(model)


def test_q_sparsity_carries_over_to_the_packed_experts():
    model = _student(sparsity=0.5)
    packed = _packed(model)
    assert all(e.sparsity == 0.5 for e in _experts(packed, TernaryExperts).values())
    assert all(m.sparsity == 0.5 for m in packed.modules() if isinstance(m, TernaryLinear))
    _assert_experts_agree(model, packed)
    _assert_logits_agree(model, packed)
    # A packed layer without the setting would compute something else.
    for served in _experts(packed, TernaryExperts).values():
        served.sparsity = 0.0
    with torch.no_grad():
        assert not torch.allclose(packed(TOKENS).logits, model(TOKENS).logits, atol=1e-3)
