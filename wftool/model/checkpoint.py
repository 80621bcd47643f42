"""Ternary model directories: Hugging Face layout plus a `wft` section in config.json.

`save_model_dir` writes weights (safetensors), config and tokenizer to a temporary
directory and renames it into place, so a crash never leaves a half-written model.
`load_ternary_model` rebuilds the family's module tree, re-applies the recorded surgery
and loads every tensor, giving logits identical to the saved model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from wftool.atomic import disk_full_error, is_disk_full, remove_leftovers, temporary_sibling
from wftool.errors import WftError
from wftool.model.families import family_by_name
from wftool.model.surgery import convert_to_bitnet, set_quant_mix
from wftool.quant.q_sparse import set_q_sparsity

FORMAT_VERSION = 1
CONFIG_KEY = "wft"


@dataclass
class TernaryMetadata:
    """What a directory needs to be rebuilt exactly; stored as config.json["wft"]."""

    family: str
    sub_norm: str
    sub_norm_eps: float | None
    quant_mix: float = 1.0  # quantization warm-up state: 1 = fully ternary
    stage: str = "convert"
    format_version: int = FORMAT_VERSION
    weights: str = "ternary_absmean"
    activations: str = "int8_absmax_per_token"
    q_sparsity: float = 0.0  # Q-Sparse: share of activations zeroed per token (0 = off)
    # A unified student's mask token and decoding settings (mask_token.DiffusionSettings).
    diffusion: dict | None = None


def is_ternary_checkpoint(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    try:
        return CONFIG_KEY in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def model_directory(path: str | Path) -> Path | None:
    """The model directory `path` names: itself when it holds config.json, or a stage's
    `final/` when given the stage folder (runs/<name>/<stage>); None otherwise."""
    path = Path(path)
    for candidate in (path, path / "final"):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def replace_directory(tmp: Path, final: Path) -> None:
    """Move a finished temporary directory to ``final``, replacing any old one."""
    old = None
    if final.exists():
        old = temporary_sibling(final, "old")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        # Renamed first: a half-deleted copy must never look like one to restore.
        trash = temporary_sibling(final, "del")
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def save_model_dir(
    model, tokenizer, output: str | Path, meta: TernaryMetadata | None = None,
    extra_files: dict[str, str] | None = None, state_dict: dict | None = None,
) -> Path:
    """Write model + tokenizer (+ `extra_files`, name -> text) atomically to ``output``,
    replacing it if present. `state_dict`: the weights to write instead of the model's own
    (those gathered from the shards of a sharded model).

    ``meta`` marks a ternary student; without it the directory is a plain Hugging Face model
    (a full-precision teacher) that any transformers user can load.
    """
    final = Path(output)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WftError(f"cannot create {final.parent}: {err.strerror or err}") from None
    remove_leftovers(final)
    tmp = temporary_sibling(final)
    existed = final.exists()
    _quiet_transformers()
    try:
        if meta is not None:
            setattr(model.config, CONFIG_KEY, asdict(meta))
        elif hasattr(model.config, CONFIG_KEY):
            delattr(model.config, CONFIG_KEY)
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        replace_directory(tmp, final)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            kept = f"{final} is as it was" if existed else "nothing was left behind"
            raise disk_full_error("the model", final, kept) from None
        if isinstance(err, OSError):
            raise WftError(f"cannot write model to {final}: {err.strerror or err}") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _quiet_transformers() -> None:
    """transformers' own per-shard progress bars only clutter wft's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def read_metadata(path: str | Path) -> TernaryMetadata:
    config_path = Path(path) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise WftError(f"{path} is not a model directory (no config.json)") from None
    except ValueError as err:
        raise WftError(f"{config_path} is corrupt: {err}") from None
    if CONFIG_KEY not in config:
        raise WftError(
            f"{path} is not a wft ternary model (config.json has no '{CONFIG_KEY}' section)",
            "run `wft convert` on it first",
        )
    section = config[CONFIG_KEY]
    try:
        meta = TernaryMetadata(**section)
    except TypeError as err:
        raise WftError(f"{config_path}: bad '{CONFIG_KEY}' section: {err}") from None
    problem = _metadata_problem(meta)
    if problem:
        raise WftError(f"{config_path}: bad '{CONFIG_KEY}' section: {problem}",
                       "restore the directory from its stage's checkpoint or convert again")
    if meta.format_version > FORMAT_VERSION:
        raise WftError(
            f"{path} was written by a newer wft (format {meta.format_version}); upgrade wftool"
        )
    return meta


def _metadata_problem(meta: TernaryMetadata) -> str | None:
    from wftool.model.families import FAMILIES
    from wftool.model.surgery import SUB_NORM_PLACEMENTS

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and (
            math.isfinite(value))

    if not isinstance(meta.family, str) or meta.family not in FAMILIES:
        return f"family {meta.family!r} is not one of {', '.join(FAMILIES)}"
    if meta.sub_norm not in SUB_NORM_PLACEMENTS:
        return f"sub_norm {meta.sub_norm!r} is not one of {', '.join(SUB_NORM_PLACEMENTS)}"
    if meta.sub_norm_eps is not None and not (number(meta.sub_norm_eps) and meta.sub_norm_eps > 0):
        return f"sub_norm_eps {meta.sub_norm_eps!r} is not a positive number"
    if not (number(meta.quant_mix) and 0 <= meta.quant_mix <= 1):
        return f"quant_mix {meta.quant_mix!r} is not a number in [0, 1]"
    if not isinstance(meta.format_version, int) or isinstance(meta.format_version, bool):
        return f"format_version {meta.format_version!r} is not an integer"
    if not (number(meta.q_sparsity) and 0 <= meta.q_sparsity < 1):
        return f"q_sparsity {meta.q_sparsity!r} is not a number in [0, 1)"
    if meta.diffusion is not None:
        from wftool.model.mask_token import DiffusionSettings

        try:
            DiffusionSettings.from_dict(meta.diffusion)
        except (ValueError, TypeError) as err:
            return str(err)
    return None


def check_finite_weights(model, path: Path) -> None:
    """Refuse a model whose weights hold NaN or infinity (a damaged file or a diverged run)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise WftError(f"{path}: tensor '{name}' holds NaN or infinite values (a damaged "
                           "file, or a run that diverged)",
                           "use an earlier checkpoint of the run (runs/<name>/<stage>/step-N) "
                           "or train again with a lower learning rate")


def _load_tokenizer_dir(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # tokenizers raises its own base Exception for corrupt JSON
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WftError(f"cannot load the tokenizer in {path}: {first}",
                       "restore tokenizer.json / tokenizer_config.json from the source model"
                       ) from None


def load_ternary_model(path: str | Path, dtype=None, device: str | torch.device = "cpu"):
    """(model, tokenizer, metadata) from a directory written by save_model_dir."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(path)
    meta = read_metadata(path)
    family = family_by_name(meta.family)
    _quiet_transformers()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the sub-norm tensors are loaded below, not by HF
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise WftError(
            f"cannot load {path}: {str(err).splitlines()[0]} (corrupt or partial checkpoint?)"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    report = convert_to_bitnet(model, family, meta.sub_norm, meta.sub_norm_eps)
    _load_tensors(model, path, [f"{name}.weight" for name in report.sub_norms])
    set_quant_mix(model, meta.quant_mix)
    set_q_sparsity(model, meta.q_sparsity)
    check_finite_weights(model, path)
    has_tokenizer = (path / "tokenizer_config.json").exists()
    tokenizer = _load_tokenizer_dir(path) if has_tokenizer else None
    return model.to(device).eval(), tokenizer, meta


def load_model_dir(path: str | Path, dtype=None, device: str | torch.device = "cpu"):
    """(model, tokenizer, metadata or None): a wft student, or a plain Hugging Face model."""
    path = Path(path)
    if is_ternary_checkpoint(path):
        return load_ternary_model(path, dtype=dtype, device=device)
    if not (path / "config.json").exists():
        raise WftError(f"{path} is not a model directory (no config.json)")
    from transformers import AutoModelForCausalLM

    from safetensors import SafetensorError

    _quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise WftError(f"cannot load {path}: {str(err).splitlines()[0]}") from None
    check_finite_weights(model, path)
    return model.to(device).eval(), _load_tokenizer_dir(path), None


def _load_tensors(model, path: Path, names: list[str]) -> None:
    """Load ``names`` from the directory's safetensors file(s) into ``model``."""
    from safetensors import SafetensorError, safe_open

    params = dict(model.named_parameters())
    saved_names = _checkpoint_names(model, {name: params[name] for name in names})
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        weight_map = {saved: "model.safetensors" for saved in saved_names.values()}
    by_file: dict[str, list[str]] = {}
    for name in names:
        saved = saved_names[name]
        if saved not in weight_map:
            raise WftError(f"{path} is missing tensor '{saved}' (corrupt or partial checkpoint)")
        by_file.setdefault(weight_map[saved], []).append(name)
    for filename, file_names in by_file.items():
        try:
            with safe_open(path / filename, framework="pt") as tensors:
                available = set(tensors.keys())
                for name in file_names:
                    saved = saved_names[name]
                    if saved not in available:
                        raise WftError(f"{path / filename} is missing tensor '{saved}'")
                    value = tensors.get_tensor(saved)
                    target = params[name]
                    if value.shape != target.shape:
                        raise WftError(
                            f"{path}: tensor '{name}' has shape {tuple(value.shape)}, "
                            f"expected {tuple(target.shape)}"
                        )
                    with torch.no_grad():
                        target.copy_(value)
        except (OSError, RuntimeError, SafetensorError) as err:
            raise WftError(f"cannot read {path / filename}: {err}") from None


def _checkpoint_names(model, params: dict[str, torch.Tensor]) -> dict[str, str]:
    """Model parameter name -> the name save_pretrained stored it under. transformers
    renames some families' modules on save (Mixtral's `mlp` is written as
    `block_sparse_moe`), so ask its own reverse mapping rather than assume the names match."""
    from transformers.core_model_loading import revert_weight_conversion

    reverted = revert_weight_conversion(model, dict(params))
    # Renaming keeps each tensor object: find every parameter's new name by identity.
    saved_by_id = {id(tensor): saved for saved, tensor in reverted.items()}
    return {name: saved_by_id.get(id(tensor), name) for name, tensor in params.items()}
