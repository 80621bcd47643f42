"""Mixture-of-experts students: routed experts see delta x {-1,0,1} per expert matrix, routers
stay full precision, and a saved student reloads to the same logits."""

import pytest
import torch
import torch.nn.functional as F

from wftool.errors import WftError
from wftool.model.checkpoint import TernaryMetadata, load_model_dir, save_model_dir
from wftool.model.families import family_for_model_type
from wftool.model.surgery import (
    convert_to_bitnet,
    current_quant_mix,
    float_activations,
    set_quant_mix,
)
from wftool.quant.bit_experts import BitExperts, ExpertRMSNorm
from wftool.quant.bitlinear import BitLinear, RMSNorm
from wftool.quant.q_sparse import current_q_sparsity, set_q_sparsity, sparsify_top_k
from wftool.quant.ternary import fake_quantize_activations, ternarize

SHARED = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2)


def _spread_routing(model):
    # Zero-initialised routers (Qwen) would send every token to the same two experts.
    for name, param in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            torch.nn.init.normal_(param, std=0.5)
    return model.eval()


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(intermediate_size=128, num_local_experts=4, **SHARED)
    return _spread_routing(MixtralForCausalLM(config))


def tiny_qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, head_dim=16,
                            num_experts=4, norm_topk_prob=True, **SHARED)
    return _spread_routing(Qwen3MoeForCausalLM(config))


def tiny_qwen2_moe():
    """Layer 0 sparse with a shared expert, layer 1 dense (`mlp_only_layers`)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=32,
                            shared_expert_intermediate_size=96, num_experts=4,
                            mlp_only_layers=[1], **SHARED)
    return _spread_routing(Qwen2MoeForCausalLM(config))


BUILDERS = pytest.mark.parametrize(
    "build", [tiny_mixtral, tiny_qwen3_moe, tiny_qwen2_moe],
    ids=["mixtral", "qwen3_moe", "qwen2_moe"])


def _convert(model, sub_norm="paper"):
    family = family_for_model_type(model.config.model_type)
    return convert_to_bitnet(model, family, sub_norm), family


def _experts(model) -> dict[str, BitExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BitExperts)}


def _randomise_sub_norms(model):
    """Non-trivial sub-norm weights, so a path that skipped them would be caught."""
    for module in model.modules():
        if isinstance(module, (RMSNorm, ExpertRMSNorm)):
            module.weight.data.uniform_(0.5, 1.5)


def _ternary(weight):
    codes, delta = ternarize(weight)
    assert set(codes.unique().tolist()) <= {-1, 0, 1}
    return codes.float() * delta


def _reference_experts(experts, hidden, top_k_index, top_k_weights, *, ternary=True,
                       sparsity=0.0):
    """The routing loop written out: each expert's gate, up and down quantized on their own."""
    weight = _ternary if ternary else (lambda w: w.detach())
    width = experts.intermediate_dim

    def project(x, w):
        if sparsity:
            x = sparsify_top_k(x, sparsity)
        return fake_quantize_activations(x) @ weight(w).T

    out = torch.zeros_like(hidden)
    for expert in range(experts.num_experts):
        token, slot = torch.where(top_k_index == expert)
        if len(token) == 0:
            continue
        x = hidden[token]
        gate_up = experts.gate_up_proj[expert]
        h = F.silu(project(x, gate_up[:width])) * project(x, gate_up[width:])
        if experts.ffn_sub_norm is not None:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + experts.ffn_sub_norm.eps)
            h = h * experts.ffn_sub_norm.weight[expert]
        y = project(h, experts.down_proj[expert])
        out.index_add_(0, token, y * top_k_weights[token, slot, None])
    return out


def _capture_experts_io(model, tokens):
    seen = {}

    def hook(name):
        def record(module, args, output):
            seen[name] = ([a.detach() for a in args], output.detach())
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in _experts(model).items()]
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    return seen


def _assert_experts_match_reference(model, tokens, **reference):
    seen = _capture_experts_io(model, tokens)
    assert set(seen) == set(_experts(model)) and seen
    for name, experts in _experts(model).items():
        (hidden, index, weights), out = seen[name]
        expected = _reference_experts(experts, hidden, index, weights, **reference)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=name)


@BUILDERS
def test_moe_layers_convert_and_routers_stay_full_precision(build):
    model = build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    routers = {n: type(m) for n, m in model.named_modules() if n.endswith("mlp.gate")}
    report, family = _convert(model)
    # Same tensor names and shapes, plus the sub-norms: Hugging Face save/load is unchanged.
    after = dict(model.named_parameters())
    assert {n: p.shape for n, p in before.items()} == {
        n: after[n].shape for n in before}
    assert set(after) - set(before) == {f"{n}.weight" for n in report.sub_norms}
    experts = _experts(model)
    sparse_layers = [i for i, layer in enumerate(model.model.layers)
                     if family.is_sparse_layer(layer)]
    assert sorted(experts) == [f"model.layers.{i}.mlp.experts" for i in sparse_layers]
    for name in experts:
        assert {f"{name}.gate_up_proj", f"{name}.down_proj"} <= set(report.quantized)
        assert f"{name}.ffn_sub_norm" in report.sub_norms
        assert after[f"{name}.ffn_sub_norm.weight"].shape == (4, experts[name].intermediate_dim)
    for name, kind in routers.items():
        module = model.get_submodule(name)
        assert type(module) is kind and name in report.kept_full_precision
        assert torch.equal(module.weight, before[f"{name}.weight"])
    assert all(not isinstance(m, BitLinear) for n, m in model.named_modules()
               if n.endswith(("mlp.gate", "shared_expert_gate", "lm_head")))


def test_qwen2_moe_shared_expert_and_dense_layers_are_bitlinear_with_sub_norms():
    model = tiny_qwen2_moe()
    report, _ = _convert(model)
    sparse, dense = model.model.layers
    for mlp in (sparse.mlp.shared_expert, dense.mlp):
        assert all(isinstance(getattr(mlp, p), BitLinear)
                   for p in ("gate_proj", "up_proj", "down_proj"))
        assert mlp.down_proj.input_norm is mlp.ffn_sub_norm
    assert type(sparse.mlp.shared_expert_gate) is torch.nn.Linear
    assert "model.layers.0.mlp.shared_expert_gate" in report.kept_full_precision
    assert "model.layers.0.mlp.shared_expert.ffn_sub_norm" in report.sub_norms
    assert "model.layers.1.mlp.ffn_sub_norm" in report.sub_norms


@BUILDERS
@pytest.mark.parametrize("sub_norm", ["paper", "none"])
def test_every_expert_projection_is_ternary_in_forward(build, sub_norm):
    model = build()
    _convert(model, sub_norm)
    _randomise_sub_norms(model)
    assert all((e.ffn_sub_norm is None) == (sub_norm == "none") for e in _experts(model).values())
    _assert_experts_match_reference(model, torch.randint(0, 128, (2, 12)))


def test_quant_mix_zero_keeps_latent_weights_and_quantizes_activations():
    model = tiny_mixtral()
    _convert(model)
    set_quant_mix(model, 0.0)
    assert current_quant_mix(model) == 0.0
    assert all(e.warming_up for e in _experts(model).values())
    _assert_experts_match_reference(model, torch.randint(0, 128, (2, 12)), ternary=False)


def test_q_sparsity_and_float_activations_reach_the_experts():
    model = tiny_qwen3_moe()
    _convert(model)
    set_q_sparsity(model, 0.5)
    assert current_q_sparsity(model) == 0.5
    assert all(e.sparsity == 0.5 for e in _experts(model).values())
    _assert_experts_match_reference(model, torch.randint(0, 128, (2, 12)), sparsity=0.5)
    with float_activations(model):
        assert not any(e.quantize_input for e in _experts(model).values())
    assert all(e.quantize_input for e in _experts(model).values())


def test_gradients_reach_latent_expert_weights_in_fp32_under_bf16_autocast():
    model = tiny_mixtral().train()
    _convert(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randint(0, 128, (2, 12))).logits
    logits.float().pow(2).mean().backward()
    for experts in _experts(model).values():
        for param in (experts.gate_up_proj, experts.down_proj, experts.ffn_sub_norm.weight):
            assert param.dtype == torch.float32 and param.grad.dtype == torch.float32
            assert param.grad.abs().sum() > 0


@BUILDERS
def test_save_and_reload_gives_identical_logits(tmp_path, build):
    model = build()
    _, family = _convert(model)
    _randomise_sub_norms(model)
    tokens = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        before = model(tokens).logits
    meta = TernaryMetadata(family.name, "paper", None)
    save_model_dir(model, None, tmp_path / "student", meta)
    reloaded, _, loaded_meta = load_model_dir(tmp_path / "student")
    assert loaded_meta == meta
    assert sorted(_experts(reloaded)) == sorted(_experts(model))
    with torch.no_grad():
        after = reloaded(tokens).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_all_placement_is_refused_for_moe_families():
    with pytest.raises(WftError, match="sub_norm=paper or none"):
        _convert(tiny_mixtral(), "all")


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_families_say_which_gguf_graph_holds_them(model_type):
    """No MoE graph with sub-norms upstream; Mixtral's experts map to the llama graph."""
    family = family_for_model_type(model_type)
    assert "MoE" in family.bitnet_gguf_blocker
    assert (family.llama_gguf_blocker is None) == (model_type == "mixtral")
    assert "wft serve --backend torch" in family.gguf_fix
