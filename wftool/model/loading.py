"""Loading the full-precision source model named by a recipe's `model` section."""

from __future__ import annotations

import torch

from wftool.errors import WftError
from wftool.model.families import Family, family_for_model_type, supported_families_text
from wftool.model.source import model_source
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
    except Exception as err:  # noqa: BLE001 - transformers refusing user values
        raise WftError(f"model.config: transformers rejects it: {_last_line(err)}") from None


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
        # The tokenizer first: it is cheap, and a synthetic one that cannot fit the
        # vocabulary is refused before a large model is allocated.
        tokenizer = load_tokenizer(spec.tokenizer, config.vocab_size, spec.revision)
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except (ValueError, TypeError, KeyError, AssertionError, RuntimeError) as err:
            # Recipes are checked when read; a config that still fails here (a value
            # wft does not know) is the user's to fix, not a traceback.
            raise WftError(f"model.config: transformers cannot build this model: "
                           f"{_last_line(err)}", "check the model.config values") from None
        return model.eval(), tokenizer, family

    source = model_source(spec.name_or_path, spec.gguf_file)
    load = {"revision": spec.revision, **source.load_kwargs}
    try:
        config = AutoConfig.from_pretrained(source.location, **load)
    except (OSError, ValueError) as err:
        raise WftError(
            f"cannot load model '{source.describe()}': {_first_line(err)}",
            "a hub id needs network access (and HF_TOKEN for gated models); "
            "a local path must be a directory with config.json, or a .gguf file",
        ) from None
    family = _family_of(config)
    dtype = torch_dtype(spec.dtype)
    if source.gguf_file and dtype == "auto":
        dtype = torch.float32  # GGUF tensors are dequantized; float32 holds them exactly
    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **load)
        if source.gguf_file:
            model = _without_gguf_quantizer(model, source)
        tokenizer = load_tokenizer(spec.tokenizer or source.location, config.vocab_size,
                                   spec.revision,
                                   gguf_file=None if spec.tokenizer else source.gguf_file)
    except (OSError, ValueError) as err:
        raise WftError(f"cannot load model '{source.describe()}': {_first_line(err)}") from None
    return model.eval(), tokenizer, family


def _without_gguf_quantizer(model, source):
    """A model loaded from GGUF carries transformers' GGUF quantizer, which refuses to save and
    to train. wft wants plain float weights: detach it where the tensors were dequantized on
    load (most architectures), dequantize first where they stayed in GGUF blocks."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    packed = getattr(quantizer, "supported", False) and not quantizer.quantization_config.dequantize
    if packed:
        try:
            return model.dequantize()
        except (NotImplementedError, ValueError) as err:
            raise WftError(f"{source.describe()}: transformers keeps this architecture's GGUF "
                           f"weights packed and cannot dequantize them ({_first_line(err)})",
                           "convert the GGUF file to a Hugging Face directory first") from None
    quantizer.remove_quantization_config(model)
    return model


def _family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    if not model_type:
        raise WftError(f"config has no model_type; supported: {supported_families_text()}")
    return family_for_model_type(model_type)


def _last_line(err: Exception) -> str:
    """The last line of transformers' message, which says what is wrong."""
    text = str(err).strip()
    return text.splitlines()[-1].strip() if text else type(err).__name__


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """A torch device from a command-line name; "auto" = the first GPU if there is one.

    A device PyTorch cannot use here (cuda on a CPU build of torch, cuda:3 with one GPU, mps
    off Apple silicon) is refused now, naming `option` (the flag or recipe field the name
    came from) and the devices there are, instead of failing at the first tensor copy.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise WftError(f"{option} {name}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    problem = _unavailable(device, option)
    if problem is not None:
        why, fix = problem
        raise WftError(f"{option} {name}: {why}; available here: "
                       f"{', '.join(available_devices())}", fix)
    return device


def available_devices() -> list[str]:
    """The devices models can run on here, spelled as --device takes them."""
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        devices += [f"xpu:{i}" for i in range(xpu.device_count())]
    return devices


def _unavailable(device: torch.device, option: str) -> tuple[str, str] | None:
    """(why, fix) when PyTorch cannot run models on `device` here, else None."""
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if torch.cuda.is_available():
            return _past_the_last(device, torch.cuda.device_count(), option)
        if torch.version.cuda is None:
            return (f"no CUDA GPU is visible to PyTorch (torch {torch.__version__} is a CPU "
                    "build)", f"{_use(option, 'cpu')}, or install a CUDA build of torch")
        return (f"no CUDA GPU is visible to PyTorch (torch {torch.__version__}, built for "
                f"CUDA {torch.version.cuda}, finds no GPU)",
                f"{_use(option, 'cpu')}, or check nvidia-smi and CUDA_VISIBLE_DEVICES")
    if device.type == "mps":
        if torch.backends.mps.is_available():
            return _past_the_last(device, 1, option)
        return ("Apple's MPS backend is not available here (it needs macOS on Apple silicon)",
                _use(option, "cpu"))
    backend = getattr(torch, device.type, None)  # xpu, and accelerators torch adds later
    if backend is None or not hasattr(backend, "is_available"):
        return f"wft does not run models on {device.type}", _use(option, "cpu, cuda or mps")
    if not backend.is_available():
        return f"PyTorch finds no {device.type} device", _use(option, "cpu")
    return _past_the_last(device, backend.device_count(), option)


def _past_the_last(device: torch.device, count: int, option: str) -> tuple[str, str] | None:
    """(why, fix) when the device index is not below the number of such devices."""
    if device.index is None or device.index < count:
        return None
    seen = f"{count} {device.type} device" + ("s" if count != 1 else "")
    return (f"PyTorch sees only {seen}",
            f"{_use(option, device.type)} for the first, or an index below {count}")


def _use(option: str, value: str) -> str:
    """The fix, spelled for a flag (`use --device cpu`) or a recipe field (`set ...=cpu`)."""
    return f"use {option} {value}" if option.startswith("--") else f"set {option}={value}"
