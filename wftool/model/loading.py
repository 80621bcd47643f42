"""Loading the full-precision source model named by a recipe's `model` section."""

from __future__ import annotations

import torch

from wftool.errors import WftError
from wftool.model.families import Family, family_for_model_type, supported_families_text
from wftool.model.tokenizer import load_tokenizer
from wftool.recipe.schema import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str):
    return "auto" if name == "auto" else DTYPES[name]


def build_config(spec: ModelSpec):
    """A Hugging Face config from the recipe's `model.config` mapping."""
    from transformers import AutoConfig

    values = dict(spec.config)
    model_type = values.pop("model_type")
    family_for_model_type(model_type)  # fail early, with the supported list
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError) as err:
        raise WftError(f"model.config: {err}") from None


def load_source_model(spec: ModelSpec):
    """(model, tokenizer, family) for the recipe's full-precision model."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if spec.config is not None:
        config = build_config(spec)
        family = family_for_model_type(config.model_type)
        torch.manual_seed(spec.seed)
        dtype = torch.float32 if spec.dtype == "auto" else DTYPES[spec.dtype]
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tokenizer = load_tokenizer(spec.tokenizer, config.vocab_size, spec.revision)
        return model.eval(), tokenizer, family

    source = spec.name_or_path
    try:
        config = AutoConfig.from_pretrained(source, revision=spec.revision)
    except (OSError, ValueError) as err:
        raise WftError(
            f"cannot load model '{source}': {_first_line(err)}",
            "a hub id needs network access (and HF_TOKEN for gated models); "
            "a local path must be a directory with config.json",
        ) from None
    family = _family_of(config)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=spec.revision, dtype=torch_dtype(spec.dtype)
        )
        tokenizer = load_tokenizer(spec.tokenizer or source, config.vocab_size, spec.revision)
    except (OSError, ValueError) as err:
        raise WftError(f"cannot load model '{source}': {_first_line(err)}") from None
    return model.eval(), tokenizer, family


def _family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise WftError(f"config has no model_type; supported: {supported_families_text()}")
    return family_for_model_type(model_type)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def resolve_device(name: str):
    """A torch device from a command-line name; "auto" = the first GPU if there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise WftError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, ...)") from None
