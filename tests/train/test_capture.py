"""Q/K/V capture: the model's masks stay in force and the captured tensors are the layer's own."""

import sys

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tests.conftest import tiny_llama, tiny_qwen3
from wftool.model.families import family_for_model_type
from wftool.model.surgery import convert_to_bitnet
from wftool.train.capture import attention_modules, capture_qkv

BUILDERS = {"llama": tiny_llama, "qwen3": tiny_qwen3}
CASES = [(f, impl) for f in BUILDERS for impl in ("sdpa", "eager")]
SEQ = 24
LAYER = 1  # the last layer, so layer 0 runs through the capture unchanged first


@pytest.fixture(params=CASES, ids=[f"{f}-{impl}" for f, impl in CASES])
def model(request):
    family, impl = request.param
    model = BUILDERS[family]()
    model.set_attn_implementation(impl)
    assert model.config._attn_implementation == impl
    return model


def _family(model):
    return family_for_model_type(model.config.model_type)


def _logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def _captured_logits(model, **inputs):
    with torch.no_grad(), capture_qkv(model, _family(model), LAYER) as sink:
        logits = model(**inputs, use_cache=False).logits
    assert set(sink) == {"q", "k", "v"}
    return logits


def _ids(batch=2, seq=SEQ):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def _packed_positions():
    # Row 0 holds documents of 10 and 14 tokens, row 1 of 16 and 8.
    return torch.stack([
        torch.cat([torch.arange(10), torch.arange(14)]),
        torch.cat([torch.arange(16), torch.arange(8)]),
    ])


def test_packed_documents_stay_apart_under_capture(model):
    ids, positions = _ids(), _packed_positions()
    plain = _logits(model, input_ids=ids)
    packed = _logits(model, input_ids=ids, position_ids=positions)
    captured = _captured_logits(model, input_ids=ids, position_ids=positions)
    torch.testing.assert_close(captured, packed, atol=1e-5, rtol=1e-5)
    # Each document, run on its own, gives the same logits: the packed mask is in force.
    for row, cut in ((0, 10), (1, 16)):
        for span in (slice(0, cut), slice(cut, SEQ)):
            alone = _logits(model, input_ids=ids[row : row + 1, span])[0]
            torch.testing.assert_close(captured[row, span], alone, atol=1e-5, rtol=1e-4)
    # Without the packed mask, second documents would attend to the first ones.
    assert (captured - plain).abs().max() > 1e-2


def test_padding_mask_stays_in_force_under_capture(model):
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, -5:] = 0  # right padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions)
    real = mask.bool()
    captured = _captured_logits(model, **inputs)
    torch.testing.assert_close(captured[real], _logits(model, **inputs)[real], atol=1e-5, rtol=1e-5)
    for row in range(2):
        alone = _logits(model, input_ids=ids[row : row + 1, real[row]])[0]
        torch.testing.assert_close(captured[row, real[row]], alone, atol=1e-5, rtol=1e-4)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _reference_qkv(attention, hidden, cos, sin):
    """q, k, v recomputed from the layer's input with its own projections (and QK-norms),
    RoPE written out here; heads laid out [batch, seq, heads, dim] and flattened."""
    shape = (*hidden.shape[:-1], -1, attention.head_dim)
    q = attention.q_proj(hidden).view(shape)
    k = attention.k_proj(hidden).view(shape)
    v = attention.v_proj(hidden).view(shape)
    if hasattr(attention, "q_norm"):
        q, k = attention.q_norm(q), attention.k_norm(k)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    return q.flatten(2), k.flatten(2), v.flatten(2)


def test_captured_qkv_are_the_layers_own(model):
    config = model.config
    attention = attention_modules(model, _family(model))[LAYER]
    seen = {}

    def record_input(module, args, kwargs):
        seen["hidden"] = kwargs["hidden_states"]
        seen["cos"], seen["sin"] = kwargs["position_embeddings"]

    handle = attention.register_forward_pre_hook(record_input, with_kwargs=True)
    ids, positions = _ids(), _packed_positions()
    try:
        with torch.no_grad(), capture_qkv(model, _family(model), LAYER) as sink:
            model(input_ids=ids, position_ids=positions, use_cache=False)
            expected = _reference_qkv(attention, seen["hidden"], seen["cos"], seen["sin"])
    finally:
        handle.remove()
    kv_width = config.num_key_value_heads * attention.head_dim
    widths = {"q": config.num_attention_heads * attention.head_dim, "k": kv_width, "v": kv_width}
    assert widths["q"] != widths["k"]  # GQA, so KV width is really checked
    for name, reference in zip("qkv", expected):
        assert sink[name].shape == (2, SEQ, widths[name])
        torch.testing.assert_close(sink[name], reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_captured_qkv_carry_gradients(model, autocast):
    attention = attention_modules(model, _family(model))[LAYER]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with capture_qkv(model, _family(model), LAYER) as sink:
            model(input_ids=_ids(), position_ids=_packed_positions(), use_cache=False)
    assert all(sink[name].isfinite().all() for name in "qkv")
    sum(sink[name].float().square().mean() for name in "qkv").backward()
    for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
        assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    # A frozen teacher under no_grad gives plain tensors.
    with torch.no_grad(), capture_qkv(model, _family(model), LAYER) as sink:
        model(input_ids=_ids(), use_cache=False)
    assert not sink["q"].requires_grad


def _attention_state(model):
    modeling = sys.modules[type(attention_modules(model, _family(model))[0]).__module__]
    return (
        dict(ALL_ATTENTION_FUNCTIONS.items()),
        modeling.eager_attention_forward,
        [dict(vars(m)) for m in attention_modules(model, _family(model))],
    )


def test_nothing_is_left_behind(model):
    impl = model.config._attn_implementation
    before = _attention_state(model)
    reference = _logits(model, input_ids=_ids())
    with capture_qkv(model, _family(model), LAYER):
        assert model.config._attn_implementation == impl
        model(input_ids=_ids(), use_cache=False)
    assert model.config._attn_implementation == impl
    after = _attention_state(model)
    assert after[0] == before[0] and after[1] is before[1]
    for module_before, module_after in zip(before[2], after[2]):
        assert module_before.keys() == module_after.keys()
    torch.testing.assert_close(_logits(model, input_ids=_ids()), reference, atol=0, rtol=0)


def test_student_and_teacher_captured_together():
    student, teacher = tiny_llama(), tiny_qwen3()
    teacher.set_attn_implementation("eager")
    ids = _ids()
    with capture_qkv(student, _family(student), 0) as s_qkv:
        with capture_qkv(teacher, _family(teacher), 1) as t_qkv:
            student(input_ids=ids, use_cache=False)
            assert not t_qkv
            teacher(input_ids=ids, use_cache=False)
    assert s_qkv["q"].shape == (2, SEQ, 64) and t_qkv["q"].shape == (2, SEQ, 128)
    with pytest.raises(ValueError, match="already being captured"):
        with capture_qkv(student, _family(student), 0), capture_qkv(student, _family(student), 0):
            pass


def test_converted_student_keeps_packed_mask():
    model = tiny_llama()
    convert_to_bitnet(model, _family(model))
    ids, positions = _ids(), _packed_positions()
    torch.testing.assert_close(
        _captured_logits(model, input_ids=ids, position_ids=positions),
        _logits(model, input_ids=ids, position_ids=positions),
        atol=1e-5, rtol=1e-5,
    )
