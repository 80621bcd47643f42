"""QK-Clip, the "Clip" of MuonClip (Kimi K2; METHOD.md section 8), as a training step hook.

During a step's forward passes each attention head's largest pre-softmax logit
S_h = max (q . k) * scaling over the (query, key) pairs its mask allows is tracked, with q
and k exactly as the attention function receives them (after RoPE and any QK-norm, K at KV
width). After the optimizer update, a head with S_h > tau gets its q_proj rows (and bias)
multiplied by sqrt(tau / S_h) and each KV head g its k_proj rows by sqrt(tau / M_g), M_g the
largest S_h among the query heads that read it (with MHA, M_g = S_h). On the step's layer
inputs every head's largest logit then is at most tau: tau * sqrt(S_h / M_g) <= tau. Heads
under tau keep their q rows bit-identical; under GQA a head that shares its KV head with a
clipped head sees its logits shrink by sqrt(tau / M_g) too, since K is shared.

Tracking wraps the attention function the layers already call (see wftool/train/capture.py
for why `config._attn_implementation` is left alone): the "sdpa" entry of transformers'
AttentionInterface, or the modeling file's own `eager_attention_forward`. Only the student's
attention modules carry the row the wrapper writes into, so every other model (a frozen
teacher) runs straight through, and the wrapped function is called with the very same
arguments, so outputs are unchanged. The wrapper is installed in `before_step` and removed
in `after_step`; evaluation between steps does not pay for it. The maxima are computed under
no_grad in fp32 (autocast off), chunked over queries: one extra Q K^T product per layer and
micro-batch, in fp32, so on GPUs slower than the attention's own bf16 kernel.

Masks: a boolean 4D mask (True = attend), an additive float mask (pairs at the dtype's
minimum or -inf are excluded; the additive values themselves are not counted), or no mask,
which means causal for sdpa (its `is_causal`) and "everything" for eager, as the kernels do.

Several processes: each rank tracks its own micro-batches; `after_step` all-reduces the
maxima with MAX, so every rank applies the same factors, and FSDP2 row shards are rescaled
where they live (`wftool.train.muon.local_rows` / `scale_rows`, no gather).

QK-norm (Qwen3: q_norm / k_norm, one RMSNorm weight of length head_dim shared by all heads,
applied after the projection): the norm divides out any rescale of q_proj or k_proj rows, so
a per-head clip through the projections does nothing. What does work is the shared norm
weights: q_norm and k_norm of a layer whose largest S_h exceeds tau are both multiplied by
sqrt(tau / max_h S_h), which scales every logit of that layer by tau / max_h S_h (RoPE and
the dot product are linear). The bound is exact, but per layer, not per head: heads under tau
in a clipped layer shrink by the same factor. The projections are left alone.

Ternary students (BitLinear): the latent weights, which the optimizer updates and the
quantizer reads, are rescaled. Ternary weights share one absmean scale per matrix, so the
ternary logits do not follow the factors. Measured (tests/train/test_qk_clip.py) on 1024-wide
random q/k matrices, 4 of 16 heads' rows times 0.7 (a full-precision logit factor of 0.49):
those heads' ternary max logits fall only to about 0.7-0.85 of before, depending on the draw
(more of their entries round to 0, but the survivors keep the matrix scale), scattered
widely between heads, and the heads left alone fall to about 0.87-0.89 (the shared scale
fell; their latent rows stay bit-identical). So on a ternary student one clip brings a head
towards tau, not surely under it, and moves its neighbours; each later step clips again
while a head still exceeds tau. With full-precision weights the bound is exact.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
import torch.distributed as dist
from torch import nn

from wftool.model.families import Family, head_dim
from wftool.train.capture import replaced_entry
from wftool.train.muon import local_rows, scale_rows

_ROW = "_wft_qk_max_row"  # a tracked attention module's row of the step's [layer, head] maxima
_EAGER = "eager_attention_forward"
_CHUNK_ELEMENTS = 1 << 25  # fp32 logits per query chunk: 128 MiB
_SUPPORTED = ("sdpa", "eager")


def _allowed(mask: torch.Tensor | None, start: int, stop: int, kv_len: int, causal: bool,
             device: torch.device) -> torch.Tensor | None:
    """Which (query start..stop, key) pairs the attention lets through; None for all."""
    if mask is None:
        if not causal:
            return None
        queries = torch.arange(start, stop, device=device)[:, None]
        return queries >= torch.arange(kv_len, device=device)[None, :]  # sdpa: top-left
    rows = mask[:, :, start:stop]
    if rows.dtype == torch.bool:
        return rows
    return rows > torch.finfo(rows.dtype).min / 2  # additive: blocked pairs sit at min or -inf


@torch.no_grad()
def head_maxima(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                scaling: float, causal: bool) -> torch.Tensor:
    """[heads] fp32: each query head's largest (q . k) * scaling over the allowed pairs.

    `query` is [batch, heads, q_len, dim], `key` [batch, kv_heads, kv_len, dim] (GQA: query
    head h reads KV head h // (heads / kv_heads)); `causal` applies only without a mask."""
    batch, heads, q_len, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    with torch.autocast(query.device.type, enabled=False):
        keys = key.detach().float().unsqueeze(2).transpose(-1, -2)  # [b, kv, 1, dim, kv_len]
        chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * heads * kv_len))
        best = torch.full((heads,), float("-inf"), device=query.device)
        for start in range(0, q_len, chunk):
            stop = min(start + chunk, q_len)
            q = query[:, :, start:stop].detach().float()
            q = q.reshape(batch, kv_heads, heads // kv_heads, stop - start, dim)
            logits = (q @ keys).reshape(batch, heads, stop - start, kv_len) * scaling
            allowed = _allowed(mask, start, stop, kv_len, causal, query.device)
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            best = torch.maximum(best, logits.amax(dim=(0, 2, 3)))
    return best


@functools.cache
def _tracking(attention: Callable, mask_none_is_causal: bool) -> Callable:
    """`attention`, which first folds the call's per-head maxima into the row of a module
    that carries one (other modules pass straight through). One wrapper per function, so a
    compiled model sees the same one on every step."""

    def tracking_attention(module, query, key, value, attention_mask, *args, **kwargs):
        row = getattr(module, _ROW, None)
        if row is not None:
            is_causal = kwargs.get("is_causal")
            if is_causal is None:
                is_causal = getattr(module, "is_causal", True)
            causal = mask_none_is_causal and bool(is_causal) and query.shape[2] > 1
            scaling = kwargs.get("scaling", getattr(module, "scaling", None))
            if scaling is None:  # sdpa's default
                scaling = query.shape[-1] ** -0.5
            seen = head_maxima(query, key, attention_mask, scaling, causal)
            row.copy_(torch.maximum(row, seen.to(row.device)))
        return attention(module, query, key, value, attention_mask, *args, **kwargs)

    tracking_attention.wft_qk_clip_of = attention
    return tracking_attention


@contextmanager
def _interface_entry_tracked(interface, name: str) -> Iterator[None]:
    with replaced_entry(interface, name, _tracking(interface[name], mask_none_is_causal=True)):
        yield


@contextmanager
def _eager_tracked(modeling) -> Iterator[None]:
    previous = getattr(modeling, _EAGER)
    setattr(modeling, _EAGER, _tracking(previous, mask_none_is_causal=False))
    try:
        yield
    finally:
        setattr(modeling, _EAGER, previous)


def _implementation(attention: nn.Module) -> str:
    name = attention.config._attn_implementation or "eager"
    if name not in _SUPPORTED:
        raise ValueError(f"QK-clip tracks attention logits under attn_implementation 'sdpa' or "
                         f"'eager', not {name!r}; load the student with one of them")
    return name


def _scale_vector(param: torch.Tensor, factor: torch.Tensor) -> None:
    """Multiply a 1-D parameter (a bias, a norm weight; FSDP2 shards it by rows too) by
    `factor`: one number, or one per element."""
    held = local_rows(param)
    local = param.to_local() if hasattr(param, "to_local") else param
    if factor.ndim:
        factor = factor[held.start:held.stop]
    local.mul_(factor.to(local.dtype))


class QKClip:
    """Per-head QK-clip at threshold `tau` on the attention layers of `model`.

    `model` may be sharded with FSDP2 after this hook is built: parameters are looked up at
    each `after_step`, never kept."""

    name = "qk_clip"

    def __init__(self, model: nn.Module, family: Family, tau: float):
        if not tau > 0:
            raise ValueError(f"qk_clip tau must be positive, got {tau}")
        self.model = model
        self.family = family
        self.tau = float(tau)
        attentions = self._attentions()
        for attention in attentions:
            _implementation(attention)
        self.heads = model.config.num_attention_heads
        self.qk_norm = _shared_qk_norm(attentions[0], self._head_dim(attentions[0]))
        self._tracked = ExitStack()
        self._maxima: torch.Tensor | None = None  # [layers, heads] during a step
        # The latest step's [layer, head] maxima (before its clip, all ranks), on the device.
        self.last_maxima: torch.Tensor | None = None
        self._last_max: torch.Tensor | None = None
        self._last_clipped: torch.Tensor | None = None
        # (layer, head) clips over the run: the resumed count plus this process's, which
        # stays on the device until a checkpoint reads it.
        self._clipped_before = 0
        self._clipped_since: torch.Tensor | None = None

    def _attentions(self) -> list[nn.Module]:
        layers = self.model.get_submodule(self.family.layers)
        return [layer.get_submodule(self.family.attention) for layer in layers]

    def _head_dim(self, attention: nn.Module) -> int:
        return getattr(attention, "head_dim", None) or head_dim(self.model.config)

    def before_step(self, step: int) -> None:
        self._stop_tracking()  # a step that failed half-way left its wrappers on
        attentions = self._attentions()
        device = attentions[0].q_proj.weight.device
        self._maxima = torch.full((len(attentions), self.heads), float("-inf"), device=device)
        wrapped = set()
        for index, attention in enumerate(attentions):
            self._wrap(attention, wrapped)
            setattr(attention, _ROW, self._maxima[index])

    def _wrap(self, attention: nn.Module, wrapped: set) -> None:
        """Wrap the function `attention` calls, once per function."""
        modeling = sys.modules[type(attention).__module__]
        name = _implementation(attention)
        if name == "eager":
            if (modeling, _EAGER) not in wrapped:
                wrapped.add((modeling, _EAGER))
                self._tracked.enter_context(_eager_tracked(modeling))
            return
        interface = getattr(modeling, "ALL_ATTENTION_FUNCTIONS", None)
        if interface is None:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as interface
        if (id(interface), name) not in wrapped:
            wrapped.add((id(interface), name))
            self._tracked.enter_context(_interface_entry_tracked(interface, name))

    def _stop_tracking(self) -> None:
        for attention in self._attentions():
            if _ROW in vars(attention):
                delattr(attention, _ROW)
        self._tracked.close()
        self._tracked = ExitStack()

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        maxima, self._maxima = self._maxima, None
        self._stop_tracking()
        self.last_maxima = self._last_max = self._last_clipped = None
        if maxima is None:
            return
        if dist.is_initialized():
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)  # every rank clips alike
        clipped = maxima > self.tau
        # Every row is multiplied, heads under tau by exactly 1 (bit-identical): deciding on
        # the host which heads to touch would stall the device every step.
        for attention, layer_maxima, layer_clipped in zip(self._attentions(), maxima, clipped):
            if self.qk_norm:
                self._clip_norms(attention, layer_maxima.max())
            else:
                self._clip_projections(attention, layer_maxima, layer_clipped)
        self.last_maxima = maxima
        self._last_max, self._last_clipped = maxima.max(), clipped.sum()
        since = self._clipped_since
        self._clipped_since = self._last_clipped if since is None else since + self._last_clipped

    def _clip_projections(self, attention: nn.Module, maxima: torch.Tensor,
                          clipped: torch.Tensor) -> None:
        width = self._head_dim(attention)
        q_factor = torch.where(clipped, (self.tau / maxima).sqrt(), 1.0)
        kv_heads = attention.k_proj.weight.shape[0] // width
        group_max = maxima.view(kv_heads, -1).amax(-1)  # query heads of KV head g are adjacent
        k_factor = torch.where(group_max > self.tau, (self.tau / group_max).sqrt(), 1.0)
        for projection, factor in ((attention.q_proj, q_factor), (attention.k_proj, k_factor)):
            rows = factor.repeat_interleave(width)
            scale_rows(projection.weight, range(projection.weight.shape[0]), rows)
            if projection.bias is not None:
                _scale_vector(projection.bias, rows)

    def _clip_norms(self, attention: nn.Module, layer_max: torch.Tensor) -> None:
        factor = torch.where(layer_max > self.tau, (self.tau / layer_max).sqrt(), 1.0)
        _scale_vector(attention.q_norm.weight, factor)
        _scale_vector(attention.k_norm.weight, factor)

    def metrics(self) -> dict[str, torch.Tensor]:
        """The latest step's largest logit (before the clip) and number of clipped
        (layer, head) pairs, as device tensors the trainer copies to the host with the
        losses on logging steps; empty before the first step."""
        if self._last_max is None:
            return {}
        return {"qk_max_logit": self._last_max.detach().clone(),
                "qk_clipped_heads": self._last_clipped.float()}

    @property
    def clipped_total(self) -> int:
        """(layer, head) clips over the whole run, resumed runs included."""
        since = 0 if self._clipped_since is None else int(self._clipped_since)
        return self._clipped_before + since

    def state_dict(self) -> dict:
        return {"clipped_total": self.clipped_total}

    def load_state_dict(self, state: dict) -> None:
        self._clipped_before = int(state.get("clipped_total", 0))
        self._clipped_since = None


def _shared_qk_norm(attention: nn.Module, width: int) -> bool:
    """Whether the family normalises q and k per head with one shared weight (Qwen3)."""
    q_norm, k_norm = getattr(attention, "q_norm", None), getattr(attention, "k_norm", None)
    if q_norm is None and k_norm is None:
        return False
    shapes = [tuple(getattr(norm, "weight", torch.empty(0)).shape) for norm in (q_norm, k_norm)]
    if shapes != [(width,), (width,)]:
        raise ValueError(f"QK-clip knows QK-norms with one weight of length head_dim ({width}) "
                         f"for q and k, not weights of shapes {shapes}")
    return True
