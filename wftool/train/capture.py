"""Read Q, K, V out of one attention layer during a normal forward pass.

A registered attention function (transformers' AttentionInterface) hands the layer's
query/key/value to a sink and then runs the model's usual attention. Q and K arrive after
QK-norm and RoPE, K and V at KV width (before GQA repetition), as relation distillation needs.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

CAPTURE_IMPLEMENTATION = "wft_capture"
_registered = False


def _flatten_heads(states: torch.Tensor) -> torch.Tensor:
    batch, heads, seq, dim = states.shape
    return states.transpose(1, 2).reshape(batch, seq, heads * dim)


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sink = getattr(module, "_wft_qkv_sink", None)
    if sink is not None:
        sink.update(q=_flatten_heads(query), k=_flatten_heads(key), v=_flatten_heads(value))
    delegate = getattr(module, "_wft_delegate_attention", "sdpa")
    return ALL_ATTENTION_FUNCTIONS[delegate](module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    global _registered
    if not _registered:
        from transformers import AttentionInterface

        AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capturing_attention)
        _registered = True


def attention_modules(model, family) -> list[torch.nn.Module]:
    return [layer.get_submodule(family.attention) for layer in model.get_submodule(family.layers)]


@contextmanager
def capture_qkv(model, family, layer_index: int):
    """Within the block, each forward fills the yielded dict with q, k, v of one layer."""
    _register()
    modules = attention_modules(model, family)
    target = modules[layer_index]
    config = model.config
    previous = config._attn_implementation
    delegate = previous if previous in ("sdpa", "eager") else "sdpa"
    sink: dict[str, torch.Tensor] = {}
    target._wft_qkv_sink = sink
    target._wft_delegate_attention = delegate
    config._attn_implementation = CAPTURE_IMPLEMENTATION
    try:
        yield sink
    finally:
        config._attn_implementation = previous
        del target._wft_qkv_sink
        del target._wft_delegate_attention
