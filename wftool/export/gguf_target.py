"""Which llama.cpp architecture and GGUF type a student goes to, and what keeps it from one.

The sub-norm placement the student was converted with picks the architecture: the paper's
SubLN is llama.cpp's `bitnet` graph; no sub-norms is the plain `llama` graph (Q/K rows
permuted for its RoPE). Per-projection input norms (`all`) fit no upstream graph. The type
decides where the per-tensor delta lives and which runtime can load the file: I2_S is
BitNet.cpp's own type, so only BitNet.cpp (extern/BitNet) loads such a file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wftool.export.ternary_packing import I2_S_GROUP, QK_K
from wftool.model.families import Family, gguf_structure_blockers
from wftool.quant.bitlinear import BitLinear

EXPORT_TYPES = ("tq1_0", "tq2_0", "i2_s", "f16", "bf16")
ARCH_FOR_SUB_NORM = {"paper": "bitnet", "none": "llama"}
# Row lengths (in_features) each packed type needs: TQ blocks of 256, I2_S groups of 128.
ROW_MULTIPLE = {"tq1_0": QK_K, "tq2_0": QK_K, "i2_s": I2_S_GROUP}


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
        if self.export_type in ("tq1_0", "tq2_0"):
            return "fp16, as the block scale d of every TQ block (rounded)"
        kind = self.export_type
        return f"{kind}, folded into the {kind.upper()} values (rounded)"

    def stored_delta(self, delta: float) -> float:
        """The delta the file holds, as llama.cpp reads it back."""
        if self.export_type == "i2_s" or self.scale_tensors:
            return float(np.float32(delta))
        if self.export_type == "bf16":
            import torch

            return float(torch.tensor(delta, dtype=torch.float32).bfloat16().float())
        return float(np.float16(delta))


def plan_gguf_export(model, family: Family, sub_norm: str, quant_mix: float,
                     export_type: str) -> tuple[GgufTarget | None, list[str]]:
    """The architecture the student fits and everything that keeps it from an exact GGUF of
    `export_type` there (an empty list when it fits)."""
    if export_type not in EXPORT_TYPES:
        raise ValueError(f"export type must be one of {EXPORT_TYPES}")
    arch = ARCH_FOR_SUB_NORM.get(sub_norm)
    if arch is None:
        problems = [(f"sub_norm placement '{sub_norm}': per-projection input norms fit no "
                     "llama.cpp architecture (bitnet needs 'paper', llama needs 'none')")]
    else:
        problems = gguf_structure_blockers(family, model.config, sub_norm, arch)
    if quant_mix < 1.0:
        problems.append(f"quantization warm-up is unfinished (mix {quant_mix:.3f} < 1): the "
                        "latent weights are not yet the ternary ones the model was trained as")
    problems += _projection_problems(model, export_type)
    target = GgufTarget(arch, export_type) if arch else None
    return target, list(dict.fromkeys(problems))


def _projection_problems(model, export_type: str) -> list[str]:
    """The first projection with a bias and the first with rows the type cannot hold: one
    line per kind says why and names a tensor and its shape."""
    bias = rows = None
    multiple = ROW_MULTIPLE.get(export_type)
    for name, module in model.named_modules():
        if not isinstance(module, BitLinear):
            continue
        if bias is None and module.bias is not None:
            bias = f"{name} has a bias, which wft does not write to GGUF"
        if rows is None and multiple and module.in_features % multiple:
            rows = (f"{name}.weight {tuple(module.weight.shape)}: rows of {module.in_features} "
                    f"are not a multiple of {multiple} ({export_type.upper()})")
    return [p for p in (bias, rows) if p]
