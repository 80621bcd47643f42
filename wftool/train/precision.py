"""Which numeric precision a run computes in, chosen once from the recipe and the device.

Master weights and optimizer state are always fp32 (the trainer casts the student); this
only decides whether forward and backward run under bf16 autocast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    compute: str  # "bf16" (autocast) or "fp32"

    def autocast(self, device: torch.device):
        if self.compute == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def describe(self) -> str:
        if self.compute == "bf16":
            return "bf16 autocast compute, fp32 master weights and optimizer state"
        return "fp32 compute, fp32 master weights and optimizer state"


def resolve_precision(setting: str, device: torch.device) -> Precision:
    """`auto`: bf16 autocast on a GPU that supports it, fp32 elsewhere (bf16 matmuls are
    emulated and slow on most CPUs)."""
    if setting == "auto":
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return Precision("bf16" if gpu_bf16 else "fp32")
    return Precision(setting)
