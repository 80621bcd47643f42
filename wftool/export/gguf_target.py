"""Which llama.cpp architecture and GGUF type a student goes to, and what keeps it from one.

The sub-norm placement the student was converted with picks the architecture: the paper's
SubLN is llama.cpp's `bitnet` graph; no sub-norms is the plain `llama` graph (Q/K rows
permuted for its RoPE), which also runs Mixtral-style routed experts where the family table
names its expert tensors. Per-projection input norms (`all`) fit no upstream graph. The type
decides where the per-tensor delta lives and which runtime can load the file: I2_S is
BitNet.cpp's own type, so only BitNet.cpp (extern/BitNet) loads such a file; Q2_0 is
llama.cpp's ternary-capable type with GPU kernels (TQ1_0 / TQ2_0 have CPU ones only). Each
thing that keeps a student (or its tokenizer, see gguf_tokenizer.py) from an exact file is a
Blocker: the reason, and what to do about that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from wftool.export.gguf_tokenizer import tokenizer_blockers
from wftool.export.ternary_packing import I2_S_GROUP, QK2_0, QK_K
from wftool.model.families import Family, head_dim
from wftool.quant.bit_experts import BitExperts
from wftool.quant.bitlinear import BitLinear, RMSNorm

EXPORT_TYPES = ("tq1_0", "tq2_0", "q2_0", "i2_s", "f16", "bf16")
# The llama.cpp graph each sub-norm placement is: `bitnet` applies the paper's two SubLN
# norms, `llama` none. Per-projection norms (`all`) fit neither.
ARCH_FOR_SUB_NORM = {"paper": "bitnet", "none": "llama"}
TORCH_FIX = "serve the student with `wft serve --backend torch`"
# Row lengths (in_features) each packed type needs: TQ blocks of 256, I2_S groups of 128,
# Q2_0 blocks of 64.
ROW_MULTIPLE = {"tq1_0": QK_K, "tq2_0": QK_K, "q2_0": QK2_0, "i2_s": I2_S_GROUP}
# Bits per ternary weight in the file, block scales included (I2_S: plus 32 bytes a tensor).
BITS_PER_WEIGHT = {"tq1_0": 1.6875, "tq2_0": 2.0625, "q2_0": 2.25, "i2_s": 2.0, "f16": 16.0,
                   "bf16": 16.0}


class Blocker(NamedTuple):
    """One thing that keeps a student from an exact GGUF, and what to do about it."""

    reason: str
    fix: str


@dataclass(frozen=True)
class GgufTarget:
    arch: str  # llama.cpp architecture: "bitnet" or "llama"
    export_type: str  # one of EXPORT_TYPES

    @property
    def runtime(self) -> str:
        """The only runtime that loads the file: upstream ids past 35 are not I2_S."""
        return "BitNet.cpp" if self.export_type == "i2_s" else "llama.cpp"

    @property
    def scale_tensors(self) -> bool:
        """Whether each projection gets an F32 `.scale` tensor. `bitnet` has always
        multiplied them in. I2_S kernels apply the delta from the tensor's tail, so an I2_S
        file has none. `llama` reads them only since llama.cpp's generic `.scale` pass
        (added with NVFP4; older builds refuse the file: "wrong number of tensors"), so the
        delta goes into the blocks or values instead, rounded, and any build loads it."""
        return self.arch == "bitnet" and self.export_type != "i2_s"

    @property
    def delta_storage(self) -> str:
        """Where and at what precision the file keeps each projection's delta."""
        if self.export_type == "i2_s":
            return "fp32, in each tensor's 32-byte I2_S tail (exact)"
        if self.scale_tensors:
            return "fp32, as an F32 .scale tensor per projection (exact)"
        kind = self.export_type
        if kind in ("tq1_0", "tq2_0", "q2_0"):
            return f"fp16, as the block scale d of every {kind.upper()} block (rounded)"
        return f"{kind}, folded into the {kind.upper()} values (rounded)"

    def stored_delta(self, delta: float) -> float:
        """The delta the file holds, as llama.cpp reads it back."""
        if self.export_type == "i2_s" or self.scale_tensors:
            return float(np.float32(delta))
        if self.export_type == "bf16":
            import torch

            return float(torch.tensor(delta, dtype=torch.float32).bfloat16().float())
        return float(np.float16(delta))


def plan_gguf_export(model, family: Family, sub_norm: str, quant_mix: float, export_type: str,
                     tokenizer=None) -> tuple[GgufTarget | None, list[Blocker]]:
    """The architecture the student fits and everything that keeps it (and `tokenizer`,
    when given) from an exact GGUF of `export_type` there (an empty list when it fits)."""
    if export_type not in EXPORT_TYPES:
        raise ValueError(f"export type must be one of {EXPORT_TYPES}")
    arch = ARCH_FOR_SUB_NORM.get(sub_norm)
    if arch is None:
        problems = [Blocker(
            f"sub_norm placement '{sub_norm}': per-projection input norms fit no llama.cpp "
            "architecture (bitnet needs 'paper', llama needs 'none')",
            "convert with convert.sub_norm=paper (llama.cpp `bitnet`) or none (`llama`) and "
            f"train again, or {TORCH_FIX}")]
    else:
        problems = _structure_problems(model, family, arch)
    if quant_mix < 1.0:
        problems.append(Blocker(
            f"quantization warm-up is unfinished (mix {quant_mix:.3f} < 1): the latent weights "
            "are not yet the ternary ones the model was trained as",
            "train past quantization.warmup_steps (the mix reaches 1 there) and export that "
            "checkpoint"))
    problems += _projection_problems(model, export_type)
    if tokenizer is not None:
        problems += [Blocker(*p) for p in tokenizer_blockers(tokenizer, model.config.vocab_size)]
    target = GgufTarget(arch, export_type) if arch else None
    return target, list(dict.fromkeys(problems))


def _structure_problems(model, family: Family, arch: str) -> list[Blocker]:
    """Where the model's graph differs from llama.cpp's `arch` graph."""
    config = model.config
    problems = []
    blocker = family.bitnet_gguf_blocker if arch == "bitnet" else family.llama_gguf_blocker
    if blocker:
        problems.append(Blocker(blocker, family.gguf_fix))
    elif (any(isinstance(m, BitExperts) for m in model.modules())
          and not family.gguf_expert_tensors(arch)):
        problems.append(Blocker(f"mixture-of-experts layers: no {arch} expert tensors are "
                                f"known for the {family.name} family", TORCH_FIX))
    if arch == "bitnet":
        if not getattr(config, "tie_word_embeddings", False):
            problems.append(Blocker(
                "lm_head is not tied to the embeddings (bitnet has no output tensor)",
                "convert with convert.sub_norm=none (llama.cpp `llama` has an output tensor) "
                f"and train again, or {TORCH_FIX}"))
        problems += _sub_norm_eps_problems(model, family, config)
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(Blocker(f"activation '{config.hidden_act}' ({arch} hard-codes SiLU)",
                                TORCH_FIX))
    if head_dim(config) * config.num_attention_heads != config.hidden_size:
        problems.append(Blocker("n_heads * head_dim != hidden_size", TORCH_FIX))
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(Blocker(f"RoPE scaling '{rope_type}' is not written to the GGUF yet",
                                TORCH_FIX))
    return problems


def _sub_norm_eps_problems(model, family: Family, config) -> list[Blocker]:
    """llama.cpp's `bitnet` graph normalises the sub-norms with the one
    layer_norm_rms_epsilon (rms_norm_eps) too, so their own eps must be the same number."""
    norms = [getattr(layer.get_submodule(slot.parent), slot.name, None)
             for layer in model.get_submodule(family.layers) for slot in family.sub_norms]
    other = next((norm.eps for norm in norms if isinstance(norm, RMSNorm)
                  and np.float32(norm.eps) != np.float32(config.rms_norm_eps)), None)
    if other is None:
        return []
    return [Blocker(
        f"the sub-norms use eps {other:g} but rms_norm_eps is {config.rms_norm_eps:g}: "
        "llama.cpp's bitnet graph applies layer_norm_rms_epsilon (rms_norm_eps) to the "
        "sub-norms too",
        "convert with convert.sub_norm_eps unset (or equal to rms_norm_eps) and train again, "
        f"or {TORCH_FIX}")]


def _projection_problems(model, export_type: str) -> list[Blocker]:
    """The first projection with a bias and the first with rows the type cannot hold: one
    blocker per kind says why and names a tensor and its shape. Routed experts are held to
    the same row lengths, and need a type with a delta per block."""
    bias = rows = None
    multiple = ROW_MULTIPLE.get(export_type)
    for name, module in model.named_modules():
        if bias is None and isinstance(module, BitLinear) and module.bias is not None:
            bias = Blocker(f"{name} has a bias, which wft does not write to GGUF", TORCH_FIX)
    for name, shape in ternary_matrices(model):
        if rows is None and multiple and shape[-1] % multiple:
            rows = Blocker(
                f"{name} {shape}: rows of {shape[-1]} are not a multiple of {multiple} "
                f"({export_type.upper()})",
                _row_fix(model, export_type))
    experts = None
    if export_type == "i2_s" and any(isinstance(m, BitExperts) for m in model.modules()):
        experts = Blocker(
            "mixture-of-experts layers: an I2_S tensor holds one delta, a 3-D expert tensor "
            "needs one per expert",
            "export with --type tq2_0, tq1_0 or q2_0 (a delta per block)")
    return [p for p in (bias, rows, experts) if p]


def ternary_matrices(model):
    """(name, shape) of every ternary weight tensor: each BitLinear's and each BitExperts'
    3-D gate_up_proj / down_proj (rows of hidden and intermediate width)."""
    for name, module in model.named_modules():
        if isinstance(module, BitLinear):
            yield f"{name}.weight", tuple(module.weight.shape)
        elif isinstance(module, BitExperts):
            for tensor in ("gate_up_proj", "down_proj"):
                yield f"{name}.{tensor}", tuple(getattr(module, tensor).shape)


def _row_fix(model, export_type: str) -> str:
    """The types that hold every row of the model: F16/BF16 always, Q2_0 where each row is
    whole blocks of 64 (exact and ternary-sized), I2_S where each row is whole groups of 128
    (BitNet.cpp only)."""
    rows = [shape[-1] for _, shape in ternary_matrices(model)]
    fix = "export with --type f16 or bf16 (any row length)"
    for other, note in (("q2_0", "rows of 64, 2.25 bits/weight"), ("i2_s", "BitNet.cpp only")):
        if other != export_type and all(n % ROW_MULTIPLE[other] == 0 for n in rows):
            fix += f", or {other} ({note})"
    return fix
