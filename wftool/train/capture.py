"""Read Q, K, V out of one attention layer during a normal forward pass.

Relation distillation needs the layer's query, key and value exactly as its attention
function receives them: Q and K after QK-norm and RoPE, K and V at KV width (before GQA
repetition). Hooks on q_proj/k_proj/v_proj would have to redo each family's norm and RoPE, so
the capture instead wraps the attention function the layer already calls.

`config._attn_implementation` is deliberately left alone. transformers builds the mask from
that name (a name it does not know gets no mask at all, which silently drops padding and
packed-document masks), and flash attention reads it again inside the kernel call. Wrapping
the function behind the existing name keeps masks, kernels and config exactly as they are
without capture; the wrapper passes every other layer and every other model straight through.

Registered implementations (sdpa, flash, flex, hub kernels) are wrapped in the
AttentionInterface the modeling file looks them up in. "eager" is not registered: each modeling
file falls back to its own `eager_attention_forward`, so that module global is wrapped instead,
which also keeps one family's eager math from leaking into another's. One wrapper object per
wrapped function, so a compiled model sees the same function on every step.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

_SINK = "_wft_qkv_sink"
_EAGER = "eager_attention_forward"


def _flatten_heads(states: torch.Tensor) -> torch.Tensor:
    batch, heads, seq, dim = states.shape
    return states.transpose(1, 2).reshape(batch, seq, heads * dim)


@functools.cache
def _capturing(attention: Callable) -> Callable:
    """`attention`, which first copies q, k, v into the sink of a module that carries one."""

    def capturing_attention(module, query, key, value, attention_mask, *args, **kwargs):
        sink = getattr(module, _SINK, None)
        if sink is not None:
            sink.update(q=_flatten_heads(query), k=_flatten_heads(key), v=_flatten_heads(value))
        return attention(module, query, key, value, attention_mask, *args, **kwargs)

    capturing_attention.wft_capture_of = attention
    return capturing_attention


def _is_capturing(attention: Callable) -> bool:
    return hasattr(attention, "wft_capture_of")


@contextmanager
def replaced_entry(interface, name: str, replacement: Callable) -> Iterator[None]:
    """`interface[name]` is `replacement` inside the block (an attention function wrapped
    for a while). Item assignment writes the interface's local mapping and leaves the
    class-wide registry alone; deleting it again restores whatever was there before."""
    previous = interface[name]
    interface[name] = replacement
    try:
        yield
    finally:
        try:
            del interface[name]
        except KeyError:
            pass
        if interface.get(name) is not previous:
            interface[name] = previous


@contextmanager
def _interface_entry_wrapped(interface, name: str) -> Iterator[None]:
    previous = interface[name]
    if _is_capturing(previous):  # another capture already wraps it; that one unwraps
        yield
        return
    with replaced_entry(interface, name, _capturing(previous)):
        yield


@contextmanager
def _eager_wrapped(modeling, cls_name: str) -> Iterator[None]:
    previous = getattr(modeling, _EAGER, None)
    if previous is None:
        raise ValueError(
            f"cannot capture Q, K, V of {cls_name}: its modeling file has no {_EAGER}; "
            "load the model with attn_implementation='sdpa'"
        )
    if _is_capturing(previous):
        yield
        return
    setattr(modeling, _EAGER, _capturing(previous))
    try:
        yield
    finally:
        setattr(modeling, _EAGER, previous)


def _attention_wrapped(attention: torch.nn.Module):
    """Within the block, the function `attention` calls for attention is wrapped.

    Mirrors transformers' `AttentionInterface.get_interface(name, eager_attention_forward)`:
    a registered name wins, otherwise "eager" (or no name) means the modeling file's own
    eager function.
    """
    modeling = sys.modules[type(attention).__module__]
    name = attention.config._attn_implementation
    interface = getattr(modeling, "ALL_ATTENTION_FUNCTIONS", None)
    if interface is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as interface
    if name is not None and name in interface:
        return _interface_entry_wrapped(interface, name)
    if name in (None, "eager"):
        return _eager_wrapped(modeling, type(attention).__name__)
    raise ValueError(
        f"cannot capture Q, K, V with attn_implementation {name!r}: it is neither 'eager' nor "
        "registered in transformers' AttentionInterface; use 'sdpa' or 'eager'"
    )


def attention_modules(model, family) -> list[torch.nn.Module]:
    """Every decoder layer's attention module, in layer order."""
    return [layer.get_submodule(family.attention) for layer in model.get_submodule(family.layers)]


@contextmanager
def capture_qkv(model, family, layer_index: int):
    """Within the block, each forward fills the yielded dict with q, k, v of one layer.

    q is [batch, seq, heads * head_dim] after QK-norm and RoPE; k (also after them) and v are
    [batch, seq, kv_heads * head_dim]. They keep their graph, so a loss on them trains the
    layer. The model's attention implementation, and so its masks, is unchanged.
    """
    target = attention_modules(model, family)[layer_index]
    if hasattr(target, _SINK):
        raise ValueError(f"attention layer {layer_index} is already being captured")
    sink: dict[str, torch.Tensor] = {}
    with _attention_wrapped(target):
        setattr(target, _SINK, sink)
        try:
            yield sink
        finally:
            delattr(target, _SINK)
