"""QK-clip: the tracked logits are the attention's own, the clip bounds them at tau and
touches nothing else, outputs stay as they were, and the QK-norm, ternary and FSDP2 cases."""

import json
import math
import sys

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tests.conftest import tiny_llama, tiny_qwen3
from tests.train.conftest import run_worker_pair
from wftool.model.families import FAMILIES
from wftool.model.surgery import convert_to_bitnet
from wftool.quant.bitlinear import bitlinear
from wftool.train.capture import attention_modules, capture_qkv
from wftool.train.qk_clip import QKClip

LLAMA, QWEN3 = FAMILIES["llama"], FAMILIES["qwen3"]
SEQ = 12
TIGHT = 1e-4  # relative: fp32 sums in another order
BOUND = 1 + 1e-4


def small_llama(kv_heads: int, bias: bool = False):
    return tiny_llama(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=64, attention_bias=bias)


def small_qwen3():
    return tiny_qwen3(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, vocab_size=64)


@torch.no_grad()
def sharpen(model, family, q_scales, k_scale: float = 20.0):
    """Large logits: q_proj rows of head h times q_scales[h] (one list per layer), k_proj
    times k_scale."""
    for attention, scales in zip(attention_modules(model, family), q_scales):
        width = attention.head_dim
        for head, scale in enumerate(scales):
            attention.q_proj.weight[head * width:(head + 1) * width] *= scale
        attention.k_proj.weight *= k_scale
    return model


def ids(batch: int = 2, seq: int = SEQ, seed: int = 1):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def packed_positions():
    return torch.stack([torch.cat([torch.arange(5), torch.arange(7)]),
                        torch.cat([torch.arange(8), torch.arange(4)])])


def documents(positions):
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    return starts.cumsum(-1)


def one_step(hook, model, **inputs):
    """before_step, a forward, after_step: what the trainer does around one step."""
    hook.before_step(0)
    with torch.no_grad():
        model(**inputs, use_cache=False)
    hook.after_step(0)
    return hook.last_maxima.clone()


def probe(model, family, run) -> torch.Tensor:
    """[layer, head] maxima of whatever `run()` computes; weights untouched (tau = inf)."""
    hook = QKClip(model, family, math.inf)
    hook.before_step(0)
    with torch.no_grad():
        run()
    hook.after_step(0)
    return hook.last_maxima


def record_attention_inputs(model, family, **inputs):
    """Each attention layer's call arguments in one forward, to replay after a clip (a
    fresh full forward would feed later layers what the clipped earlier layers now give)."""
    recorded, handles = [], []
    for attention in attention_modules(model, family):
        handles.append(attention.register_forward_pre_hook(
            lambda module, args, kwargs: recorded.append((module, dict(kwargs))),
            with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    def replay():
        for attention, kwargs in recorded:
            attention(**kwargs)

    return replay


# ---- tracking -----------------------------------------------------------------------------

def reference_maxima(model, family, allowed, bf16: bool = False, **inputs) -> torch.Tensor:
    """[layer, head] max of q.k * scaling over `allowed` [batch, q, k] pairs, from the
    q and k each layer computes (captured; under bf16 autocast if asked), written out here
    in fp32."""
    rows = []
    for index, attention in enumerate(attention_modules(model, family)):
        with torch.no_grad(), capture_qkv(model, family, index) as sink:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(**inputs, use_cache=False)
        batch, seq, _ = sink["q"].shape
        q = sink["q"].float().view(batch, seq, -1, attention.head_dim).transpose(1, 2)
        k = sink["k"].float().view(batch, seq, -1, attention.head_dim).transpose(1, 2)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = (q @ k.transpose(-1, -2)) * attention.scaling
        logits = logits.masked_fill(~allowed[:, None], float("-inf"))
        rows.append(logits.amax(dim=(0, 2, 3)))
    return torch.stack(rows)


def mask_cases():
    causal = torch.ones(SEQ, SEQ).tril().bool().expand(2, SEQ, SEQ)
    positions = packed_positions()
    docs = documents(positions)
    same_doc = docs[:, :, None] == docs[:, None, :]
    return {
        "causal": ({}, causal),
        "packed": ({"position_ids": positions}, same_doc & causal),
        "bidirectional-4d": ({"position_ids": positions, "attention_mask": same_doc[:, None]},
                             same_doc),
    }


MODELS = {
    "llama-mha": lambda: sharpen(small_llama(4), LLAMA, [[20, 30, 10, 25]] * 2),
    "llama-gqa": lambda: sharpen(small_llama(2), LLAMA, [[20, 30, 10, 25]] * 2),
    "qwen3": lambda: small_qwen3(),
}
FAMILY_OF = {"llama-mha": LLAMA, "llama-gqa": LLAMA, "qwen3": QWEN3}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(MODELS))
def test_tracked_maxima_are_the_attention_logits(name, impl):
    model, family = MODELS[name](), FAMILY_OF[name]
    model.set_attn_implementation(impl)
    for case, (extra, allowed) in mask_cases().items():
        if impl == "eager" and "attention_mask" in extra:  # eager adds the mask: 0 / min
            blocked = torch.finfo(torch.float32).min
            extra = {**extra, "attention_mask": torch.where(extra["attention_mask"], 0.0, blocked)}
        inputs = {"input_ids": ids(), **extra}
        tracked = probe(model, family, lambda: model(**inputs, use_cache=False))
        expected = reference_maxima(model, family, allowed, **inputs)
        torch.testing.assert_close(tracked, expected, rtol=TIGHT, atol=0, msg=case)
        everything = reference_maxima(model, family, torch.ones_like(allowed), **inputs)
        assert (everything - expected).abs().max() > 1e-3, case  # the mask mattered


def test_tracking_under_bf16_autocast_computes_in_fp32():
    model = MODELS["llama-gqa"]()
    inputs = {"input_ids": ids(), "position_ids": packed_positions()}
    causal = torch.ones(SEQ, SEQ).tril().bool()
    docs = documents(packed_positions())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tracked = probe(model, LLAMA, lambda: model(**inputs, use_cache=False))
    allowed = (docs[:, :, None] == docs[:, None, :]) & causal
    expected = reference_maxima(model, LLAMA, allowed, bf16=True, **inputs)
    assert tracked.dtype == torch.float32
    torch.testing.assert_close(tracked, expected, rtol=TIGHT, atol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_outputs_are_unchanged_and_other_models_untouched(impl):
    student, teacher = MODELS["llama-gqa"](), sharpen(small_llama(4), LLAMA, [[50] * 4] * 2)
    student.set_attn_implementation(impl)
    teacher.set_attn_implementation(impl)
    inputs = {"input_ids": ids(), "position_ids": packed_positions()}
    with torch.no_grad():
        plain = student(**inputs).logits
        plain_teacher = teacher(**inputs).logits
    interface_before = dict(ALL_ATTENTION_FUNCTIONS.items())
    modeling = sys.modules[type(attention_modules(student, LLAMA)[0]).__module__]
    eager_before = modeling.eager_attention_forward
    hook = QKClip(student, LLAMA, math.inf)
    hook.before_step(0)
    with torch.no_grad():
        tracked = student(**inputs).logits
        with capture_qkv(student, LLAMA, 1) as sink:  # relation distillation nests inside
            captured = student(**inputs).logits
        teacher_logits = teacher(**inputs).logits
    hook.after_step(0)
    assert torch.equal(tracked, plain) and torch.equal(captured, plain) and sink
    assert torch.equal(teacher_logits, plain_teacher)
    torch.testing.assert_close(hook.last_maxima, probe(student, LLAMA, lambda: student(**inputs)),
                               rtol=0, atol=0)
    # The teacher's much larger logits did not reach the student's maxima.
    teacher_max = probe(teacher, LLAMA, lambda: teacher(**inputs)).max()
    assert hook.last_maxima.max() < teacher_max / 2
    assert dict(ALL_ATTENTION_FUNCTIONS.items()) == interface_before
    assert modeling.eager_attention_forward is eager_before
    assert not any("_wft" in key for m in attention_modules(student, LLAMA) for key in vars(m))


def test_an_attention_implementation_it_cannot_read_is_refused():
    model = small_llama(2)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        QKClip(model, LLAMA, 10.0)
    with pytest.raises(ValueError, match="positive"):
        QKClip(small_llama(2), LLAMA, 0.0)


# ---- the clip -----------------------------------------------------------------------------

def _rows(param, head, width):
    return param.detach()[head * width:(head + 1) * width].clone()


@pytest.mark.parametrize("kv_heads,bias", [(4, False), (2, True)], ids=["mha", "gqa-bias"])
def test_clip_bounds_each_head_at_tau_and_leaves_the_rest(kv_heads, bias):
    model = sharpen(small_llama(kv_heads, bias), LLAMA, [[4, 30, 6, 3], [25, 5, 30, 4]])
    inputs = {"input_ids": ids()}
    replay = record_attention_inputs(model, LLAMA, **inputs)
    before = probe(model, LLAMA, replay)
    tau = 10.0
    attentions = attention_modules(model, LLAMA)
    width, groups = attentions[0].head_dim, 4 // kv_heads
    weights = {(i, p, part): getattr(getattr(a, p), part).detach().clone()
               for i, a in enumerate(attentions) for p in ("q_proj", "k_proj")
               for part in (("weight", "bias") if bias else ("weight",))}

    hook = QKClip(model, LLAMA, tau)
    seen = one_step(hook, model, **inputs)
    torch.testing.assert_close(seen, before, rtol=TIGHT, atol=0)
    clipped = before > tau
    assert 0 < clipped.sum() < clipped.numel()
    reported = {key: float(value) for key, value in hook.metrics().items()}
    assert reported == {"qk_max_logit": pytest.approx(float(before.max()), rel=TIGHT),
                        "qk_clipped_heads": float(clipped.sum())}

    after = probe(model, LLAMA, replay)  # the same layer inputs, the clipped weights
    assert (after <= tau * BOUND).all(), (after, tau)
    q_factor, k_factor = expected_factors(seen, tau, groups)
    torch.testing.assert_close(after, before * q_factor * k_factor, rtol=TIGHT, atol=0)
    if kv_heads == 4:  # MHA: a clipped head lands on tau, the others keep theirs exactly
        torch.testing.assert_close(after[clipped], torch.full_like(after[clipped], tau),
                                   rtol=TIGHT, atol=0)
        assert torch.equal(after[~clipped], before[~clipped])
    else:  # the setting shares a KV head between a clipped head and one under tau
        assert ((k_factor < 1) & ~clipped).any() and (k_factor == 1).any()
    for (layer, proj, part), old in weights.items():
        new = getattr(getattr(attentions[layer], proj), part).detach()
        factors = q_factor[layer] if proj == "q_proj" else k_factor[layer, ::groups]
        for head, factor in enumerate(factors):
            if factor == 1:
                assert torch.equal(_rows(new, head, width), _rows(old, head, width))
            else:
                torch.testing.assert_close(_rows(new, head, width),
                                           _rows(old, head, width) * factor, rtol=1e-6, atol=0)


def expected_factors(maxima, tau, groups):
    """[layer, head] factors of q (sqrt(tau / S_h) above tau) and of the k rows each query
    head reads (sqrt(tau / M_g), M_g the largest S_h sharing the KV head)."""
    layers, heads = maxima.shape
    group_max = maxima.view(layers, heads // groups, groups).amax(-1)
    group_max = group_max.repeat_interleave(groups, -1)
    q_factor = torch.where(maxima > tau, (tau / maxima).sqrt(), 1.0)
    return q_factor, torch.where(group_max > tau, (tau / group_max).sqrt(), 1.0)


def test_qk_norm_clips_the_shared_norms_per_layer():
    model = small_qwen3()
    with torch.no_grad():  # larger logits in layer 0 than in layer 1
        for attention, scale in zip(attention_modules(model, QWEN3), (4.0, 1.5)):
            attention.q_norm.weight.mul_(scale)
            attention.k_norm.weight.mul_(scale)
    inputs = {"input_ids": ids()}
    replay = record_attention_inputs(model, QWEN3, **inputs)
    before = probe(model, QWEN3, replay)
    attentions = attention_modules(model, QWEN3)

    # Why not the projections: a q_proj row rescale is divided out by q_norm.
    width = attentions[0].head_dim
    with torch.no_grad():
        attentions[0].q_proj.weight[:width] *= 0.25
    torch.testing.assert_close(probe(model, QWEN3, replay), before, rtol=1e-3, atol=0)
    with torch.no_grad():
        attentions[0].q_proj.weight[:width] *= 4.0

    tau = float(before[0].median())
    assert before[1].max() < tau < before[0].max()
    projections = [p.detach().clone() for a in attentions
                   for p in (a.q_proj.weight, a.k_proj.weight)]
    norms = [n.weight.detach().clone() for a in attentions for n in (a.q_norm, a.k_norm)]
    hook = QKClip(model, QWEN3, tau)
    seen = one_step(hook, model, **inputs)
    assert float(hook.metrics()["qk_clipped_heads"]) == float((before > tau).sum())

    after = probe(model, QWEN3, replay)
    assert (after <= tau * BOUND).all()
    torch.testing.assert_close(after[0], before[0] * tau / before[0].max(), rtol=TIGHT, atol=0)
    assert torch.equal(after[1], before[1])  # layer 1 was under tau: untouched
    factor = math.sqrt(tau / float(seen[0].max()))
    torch.testing.assert_close(attentions[0].q_norm.weight, norms[0] * factor, rtol=1e-6, atol=0)
    torch.testing.assert_close(attentions[0].k_norm.weight, norms[1] * factor, rtol=1e-6, atol=0)
    assert torch.equal(attentions[1].q_norm.weight, norms[2])
    assert torch.equal(attentions[1].k_norm.weight, norms[3])
    new = [p.detach() for a in attentions for p in (a.q_proj.weight, a.k_proj.weight)]
    assert all(torch.equal(a, b) for a, b in zip(new, projections))


def test_ternary_student_clip_lowers_the_clipped_heads_but_not_to_tau():
    """A BitLinear student: the latent rows are rescaled (those of heads under tau stay
    bit-identical), but the ternary logits do not follow the full-precision factors."""
    model = sharpen(small_llama(4), LLAMA, [[40, 200, 60, 160]] * 2, k_scale=100.0)
    convert_to_bitnet(model, LLAMA, "paper", None)
    inputs = {"input_ids": ids()}
    replay = record_attention_inputs(model, LLAMA, **inputs)
    before = probe(model, LLAMA, replay)
    tau = float(before.median())
    clipped = before > tau
    assert 0 < clipped.sum() < clipped.numel()
    attentions = attention_modules(model, LLAMA)
    latent = [a.q_proj.weight.detach().clone() for a in attentions]

    one_step(QKClip(model, LLAMA, tau), model, **inputs)
    after = probe(model, LLAMA, replay)
    assert (after[clipped] < before[clipped]).all()  # the clipped heads come down...
    assert (after[clipped] > tau * BOUND).any()  # ...but some stay above tau
    # The matrix-wide ternary scale moved the heads under tau as well.
    assert (after[~clipped] / before[~clipped] - 1).abs().max() > 1e-2
    width = attentions[0].head_dim
    for layer, attention in enumerate(attentions):
        for head in torch.nonzero(~clipped[layer]).flatten().tolist():
            assert torch.equal(_rows(attention.q_proj.weight, head, width),
                               _rows(latent[layer], head, width))


def test_ternary_logits_fall_by_about_the_square_root_of_the_factor():
    """What the module docstring states, at a realistic width (16 heads of 64 on 1024
    inputs): q and k rows of 4 heads times c = 0.7, a full-precision logit factor of 0.49."""
    generator = torch.Generator().manual_seed(0)
    heads, width, hidden, c = 16, 64, 1024, 0.7
    wq, wk = (torch.randn(heads * width, hidden, generator=generator) * 0.02 for _ in range(2))
    x = torch.randn(128, hidden, generator=generator)

    def head_maxima(wq, wk):
        q = bitlinear(x, wq).view(-1, heads, width).transpose(0, 1)
        k = bitlinear(x, wk).view(-1, heads, width).transpose(0, 1)
        return (q @ k.transpose(-1, -2)).amax(dim=(1, 2))

    rows = torch.tensor([c] * 4 + [1.0] * (heads - 4)).repeat_interleave(width)[:, None]
    ratio = head_maxima(wq * rows, wk * rows) / head_maxima(wq, wk)
    clipped, others = ratio[:4].mean(), ratio[4:].mean()
    assert c * c + 0.15 < clipped < 0.95  # measured 0.83: about c, not c^2
    assert others < 0.95  # measured 0.88: the shared absmean scale fell for every head


def test_metrics_and_a_resumed_count():
    model = MODELS["llama-gqa"]()
    hook = QKClip(model, LLAMA, 1.0)
    assert hook.metrics() == {}
    one_step(hook, model, input_ids=ids())
    first = float(hook.metrics()["qk_clipped_heads"])
    assert first > 0 and float(hook.metrics()["qk_clipped_heads"]) == first  # reading twice
    state = json.loads(json.dumps(hook.state_dict()))
    assert state == {"clipped_total": first}
    resumed = QKClip(model, LLAMA, 1.0)
    resumed.load_state_dict(state)
    one_step(resumed, model, input_ids=ids(seed=2))
    assert resumed.state_dict()["clipped_total"] == first + float(
        resumed.metrics()["qk_clipped_heads"])


# ---- several processes --------------------------------------------------------------------

@pytest.mark.slow
def test_fsdp2_shards_clip_what_one_process_clips(tmp_path):
    found = run_worker_pair("qk_clip_worker.py", tmp_path / "qk_clip.json")
    assert found["ranks_saw_different_maxima"]  # so the all-reduce mattered
    assert found["clipped_heads"] > 0 and found["clipped_heads"] == found["reference_clipped"]
    assert found["maxima_error"] < 1e-6 * found["max_logit"]
    assert found["weight_error"] < 1e-6
