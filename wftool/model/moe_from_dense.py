"""Fake MoE from dense: a Llama/Mistral model becomes a Mixtral that computes the same function.

Every expert starts as a copy of the layer's dense FFN, so whatever the router picks, the
MoE block returns the dense FFN's output (the renormalised top-k weights sum to 1 over
identical experts). The router starts random (normal, the config's initializer_range), not
zero: a zero router ties every token to the same top-k experts, and since identical experts
give the router no gradient, the others would never train; random routing sends different
tokens to different experts, whose gradients then differ, and training makes them diverge.

Mixtral stores a layer's experts as two 3-D tensors: `gate_up_proj` [E, 2I, H] (the gate rows,
then the up rows, split by `chunk(2, dim=-1)` in its forward) and `down_proj` [E, H, I].
"""

from __future__ import annotations

import copy
import re

import torch

from wftool.errors import WftError

# Dense model types whose blocks Mixtral's hold one to one (attention, RMSNorms, SwiGLU FFN).
MAPPABLE_MODEL_TYPES = {"llama": "Llama, SmolLM2", "mistral": "Mistral"}

# Config fields the Mixtral copies from the dense model (the rest are the MoE's own).
_SHARED_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
    "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
    "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
    "attention_dropout", "rope_parameters", "sliding_window",
)

# Largest relative logit difference `check_moe_equals_dense` accepts, by the models' dtype.
# The MoE sums k copies of the FFN weighted 1/k with a fused gate/up matmul, so it rounds
# differently from the dense model; a wrong mapping differs by order 1, far above these.
_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}

_FFN_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.")


def dense_to_moe(model, experts: int, top_k: int):
    """A `MixtralForCausalLM` computing what the dense Llama/Mistral `model` computes.

    Same widths, rope, norms, vocabulary, tied embeddings, dtype and device; every non-FFN
    weight is copied exactly; each layer's `experts` experts copy its FFN and the router
    (top `top_k`) is random (seeded, so a conversion repeats). The dense model is left as it was; the tokenizer needs no change.
    Raises WftError for a model it cannot map.
    """
    from transformers import MixtralForCausalLM

    config = _mixtral_config(model, experts, top_k)
    # Built on the meta device: the weights come from the dense model, so random
    # initialisation of E copies of every FFN would be wasted time and memory.
    with torch.device("meta"):
        moe = MixtralForCausalLM(config)
    moe.load_state_dict(_moe_state_dict(model, experts), strict=True, assign=True)
    _copy_buffers(model, moe)  # rope frequencies are non-persistent: not in the state dict
    if config.tie_word_embeddings:
        moe.tie_weights()  # load_state_dict(assign=True) gave lm_head its own parameter
    moe.generation_config = copy.deepcopy(model.generation_config)
    return moe.train(model.training)


def check_moe_equals_dense(dense, moe, sequences: int = 2, length: int = 16,
                           seed: int = 0) -> float:
    """Largest |MoE logit - dense logit| on a few random token sequences, over the largest
    |dense logit| (the logits' scale): 0 when the MoE computes exactly what the dense model
    does. Both models run in eval mode, in their own dtype, without gradients."""
    device = dense.get_input_embeddings().weight.device
    length = min(length, dense.config.max_position_embeddings)
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, dense.config.vocab_size, (sequences, length), generator=generator)
    tokens = tokens.to(device)
    modes = dense.training, moe.training
    dense.eval()
    moe.eval()
    try:
        with torch.no_grad():
            reference = dense(tokens).logits.float()
            candidate = moe(tokens).logits.float()
    finally:
        dense.train(modes[0])
        moe.train(modes[1])
    scale = reference.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    return ((candidate - reference).abs().max() / scale).item()


def equality_tolerance(dtype: torch.dtype) -> float:
    """The largest `check_moe_equals_dense` result that still means "the same logits"."""
    return _TOLERANCE.get(dtype, _TOLERANCE[torch.bfloat16])


def _mixtral_config(model, experts: int, top_k: int):
    from transformers import MixtralConfig

    dense = model.config
    model_type = getattr(dense, "model_type", None)
    if getattr(dense, "num_local_experts", None) or getattr(dense, "num_experts", None):
        raise WftError(f"convert.moe: the model ({model_type}) already is a Mixture of Experts",
                       "remove convert.moe from the recipe")
    if model_type not in MAPPABLE_MODEL_TYPES:
        supported = ", ".join(f"{t} ({e})" for t, e in MAPPABLE_MODEL_TYPES.items())
        raise WftError(f"convert.moe: cannot turn a {model_type} model into an MoE; "
                       f"supported: {supported}", "remove convert.moe, or start from one of those")
    biased = [f for f in ("attention_bias", "mlp_bias") if getattr(dense, f, False)]
    if biased:  # Mixtral's projections have no bias to hold them
        raise WftError(f"convert.moe: this {model_type} model has {' and '.join(biased)}, "
                       "which Mixtral's projections cannot hold", "remove convert.moe")
    shared = {f: copy.deepcopy(getattr(dense, f)) for f in _SHARED_CONFIG_FIELDS
              if hasattr(dense, f)}
    config = MixtralConfig(
        **shared,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        # No noise on the router's input and no auxiliary loss in the model's own loss:
        # the MoE's forward and loss equal the dense model's until training changes them.
        router_jitter_noise=0.0,
        output_router_logits=False,
        dtype=model.dtype,
    )
    config._attn_implementation = dense._attn_implementation  # same kernel, same rounding
    return config


def _moe_state_dict(model, experts: int) -> dict[str, torch.Tensor]:
    """The Mixtral's tensors: dense ones copied, each layer's FFN as `experts` experts."""
    state = {}
    ffn = {}  # layer index -> {gate_proj, up_proj, down_proj: weight}
    for key, tensor in model.state_dict().items():
        match = _FFN_KEY.match(key)
        if match:
            projection = key[match.end():].removesuffix(".weight")
            ffn.setdefault(int(match.group(1)), {})[projection] = tensor
        else:
            state[key] = tensor.detach().clone()
    if model.config.tie_word_embeddings:  # one tensor under both names, tied again after
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    for layer, weights in ffn.items():
        prefix = f"model.layers.{layer}.mlp."
        gate_up = torch.cat([weights["gate_proj"], weights["up_proj"]], dim=0).detach()
        # repeat, not expand: each expert must own its weights to train apart from the rest.
        state[prefix + "experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(experts, 1, 1)
        state[prefix + "experts.down_proj"] = (
            weights["down_proj"].detach().unsqueeze(0).repeat(experts, 1, 1))
        hidden = gate_up.shape[1]
        state[prefix + "gate.weight"] = _random_router(experts, hidden, layer, gate_up,
                                                       model.config.initializer_range)
    return state


def _random_router(experts: int, hidden: int, layer: int, like: torch.Tensor,
                   std: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(layer)
    weight = torch.randn(experts, hidden, generator=generator) * std
    return weight.to(dtype=like.dtype, device=like.device)


def _copy_buffers(dense, moe) -> None:
    """Give the MoE the dense model's buffers (left on the meta device by construction)."""
    for name, _ in list(moe.named_buffers()):
        path, _, attribute = name.rpartition(".")
        setattr(moe.get_submodule(path), attribute, dense.get_buffer(name).detach().clone())
