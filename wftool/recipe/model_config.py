"""`model.config` checked when the recipe is read: the Hugging Face config transformers
builds from it, and the shapes wft needs, so a bad value fails `wft recipe validate`
instead of `wft convert` (or the first training step).

transformers is imported only here, when a recipe actually has a `model.config`.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any

from wftool.recipe.fields import field_error

# name -> (smallest, largest): far beyond any model wft builds from a config, small enough
# that no single size exhausts memory on its own.
_SIZES = {
    "vocab_size": (1, 1 << 20),
    "hidden_size": (1, 1 << 16),
    "intermediate_size": (1, 1 << 18),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (1, 4096),
    "max_position_embeddings": (2, 1 << 20),
}
# name -> (lower, upper, lower bound inclusive)
_REALS = {
    "rms_norm_eps": (0.0, 1.0, False),
    "rope_theta": (0.0, 1e12, False),
    "initializer_range": (0.0, 10.0, True),
    "attention_dropout": (0.0, 1.0, True),
}
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_NULLABLE = ("num_key_value_heads", "head_dim", *_TOKEN_IDS)  # null: transformers' default
MAX_PARAMETERS = 20e9  # a randomly initialised model built on one machine


@dataclass(frozen=True)
class ModelShape:
    """What the rest of the recipe is checked against."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int


def check_model_config(values: dict[str, Any], tokenizer: str | None) -> ModelShape:
    """Check `model.config` (its keys and the config transformers builds from it); raise a
    pydantic error naming `config.<key>` on the first problem."""
    from wftool.model.families import FAMILIES, supported_families_text

    model_type = values.get("model_type")
    known = {t for family in FAMILIES.values() for t in family.model_types}
    if not isinstance(model_type, str) or model_type not in known:
        raise field_error("config.model_type",
                          f"model family {model_type!r} is not supported; supported: "
                          f"{supported_families_text()}")
    for key, value in values.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise field_error("config", f"key {key!r} is not a config field name")
        _check_value(key, value)
    for key in _REALS:  # YAML reads `rms_norm_eps: 1` as an int; transformers wants a float
        if isinstance(values.get(key), int) and not isinstance(values[key], bool):
            values[key] = float(values[key])
    hidden, heads = values.get("hidden_size"), values.get("num_attention_heads")
    if hidden and heads and values.get("head_dim") is None and hidden % heads:
        raise field_error("config.num_attention_heads",
                          f"must divide hidden_size ({hidden}) (or set head_dim)", heads)
    config = _build(model_type, values)
    shape = _shape(config)
    _check_shape(config, shape, tokenizer)
    return shape


def _check_value(key: str, value: Any) -> None:
    where = f"config.{key}"
    if key in _SIZES or key in _TOKEN_IDS:
        if value is None and key in _NULLABLE:
            return
        if isinstance(value, bool) or not isinstance(value, int):
            if not (key == "eos_token_id" and isinstance(value, list)):
                raise field_error(where, "must be an integer", value)
    if key in _SIZES:
        low, high = _SIZES[key]
        if not low <= value <= high:
            raise field_error(where, f"must be between {low} and {high}", value)
    elif key in _REALS:
        low, high, inclusive = _REALS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise field_error(where, "must be a number", value)
        if not (math.isfinite(value) and (value >= low if inclusive else value > low)
                and value <= high):
            bound = f"{'>=' if inclusive else '>'} {low:g} and <= {high:g}"
            raise field_error(where, f"must be finite, {bound}", value)
    elif key == "hidden_act":
        _check_activation(value)
    _check_finite(where, value)


def _check_finite(where: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise field_error(where, "must be a finite number", value)
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(f"{where}.{k}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(f"{where}[{i}]", v)


def _check_activation(value: Any) -> None:
    from transformers.activations import ACT2FN

    if not isinstance(value, str) or value not in ACT2FN:
        raise field_error("config.hidden_act", "not an activation transformers knows (e.g. "
                          "silu, gelu, relu, gelu_pytorch_tanh)", value)


def _build(model_type: str, values: dict[str, Any]):
    """transformers' own config from the values; its refusal becomes a message."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    # A copy: transformers fills in nested dicts (rope_scaling) it is given.
    kwargs = copy.deepcopy({k: v for k, v in values.items() if k != "model_type"})
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its warnings about token ids are ours to report
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except Exception as err:  # noqa: BLE001 - any refusal of user values is a user error
        text = str(err).strip().splitlines()
        reason = text[-1].strip() if text else type(err).__name__
        raise field_error(_named_field(str(err), values),
                          f"transformers rejects it: {reason[:200]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _named_field(message: str, values: dict[str, Any]) -> str:
    """The recipe key transformers' message is about (it names rope_scaling by its newer
    name, rope_parameters)."""
    named = re.search(r"[Ff]ield '(\w+)'", message)
    if named and named.group(1) in values:
        return f"config.{named.group(1)}"
    rope = [k for k in ("rope_scaling", "rope_parameters") if k in values]
    if rope and "rope" in message:
        return f"config.{rope[0]}"
    return f"config.{named.group(1)}" if named else "config"


def _shape(config) -> ModelShape:
    hidden, heads = config.hidden_size, config.num_attention_heads
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                "max_position_embeddings"):
        _check_value(key, getattr(config, key, None))
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None:
        if hidden % heads:
            raise field_error("config.num_attention_heads",
                              f"must divide hidden_size ({hidden}) (or set head_dim)", heads)
        head_dim = hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return ModelShape(config.vocab_size, hidden, config.num_hidden_layers, heads, kv_heads,
                      head_dim, config.max_position_embeddings)


def _check_shape(config, shape: ModelShape, tokenizer: str | None) -> None:
    if shape.num_heads % shape.num_kv_heads:
        raise field_error("config.num_key_value_heads",
                          f"must divide num_attention_heads ({shape.num_heads})",
                          shape.num_kv_heads)
    if shape.head_dim % 2:
        raise field_error("config.head_dim", "must be even (rotary embeddings)",
                          shape.head_dim)
    _check_rope(config)
    for key in _TOKEN_IDS:
        ids = getattr(config, key, None)
        for token in ids if isinstance(ids, list) else [ids]:
            if token is not None and not (isinstance(token, int) and
                                          0 <= token < shape.vocab_size):
                raise field_error(f"config.{key}",
                                  f"must be a token id below vocab_size ({shape.vocab_size})",
                                  token)
    if tokenizer == "synthetic":
        from wftool.model.tokenizer import MIN_SYNTHETIC_VOCAB

        if shape.vocab_size < MIN_SYNTHETIC_VOCAB:
            raise field_error(
                "config.vocab_size",
                f"the synthetic tokenizer has at least {MIN_SYNTHETIC_VOCAB} tokens (256 bytes "
                f"+ special tokens); set vocab_size >= {MIN_SYNTHETIC_VOCAB}", shape.vocab_size)
    params = _parameters(config, shape)
    if params > MAX_PARAMETERS:
        raise field_error("config", f"would build a model of ~{params / 1e9:,.0f}B parameters, "
                          f"over the {MAX_PARAMETERS / 1e9:.0f}B wft builds from a config; "
                          "load big models with `name_or_path`")


def _check_rope(config) -> None:
    """transformers only warns about an unknown rope_type; building the model then fails."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(rope, dict):
        return
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS:
        raise field_error("config.rope_scaling",
                          f"unknown rope_type {rope_type!r}; known: default, "
                          f"{', '.join(ROPE_INIT_FUNCTIONS)}")


def _parameters(config, shape: ModelShape) -> float:
    embeddings = shape.vocab_size * shape.hidden_size
    if not getattr(config, "tie_word_embeddings", False):
        embeddings *= 2
    attention = shape.hidden_size * shape.head_dim * (2 * shape.num_heads
                                                      + 2 * shape.num_kv_heads)
    mlp = 3 * shape.hidden_size * (getattr(config, "intermediate_size", 0) or 0)
    return float(embeddings + shape.num_layers * (attention + mlp))
