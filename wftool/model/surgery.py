"""Model surgery: BitLinear in place of every attention and MLP projection, plus SubLN.

Mixture-of-experts layers get BitExperts in place of their routed experts; routers stay
full precision. Embeddings, lm_head and the model's own norms stay full precision too. The result is the same
Hugging Face module tree with different leaves, so the family's own forward still runs.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from wftool.errors import WftError
from wftool.model.families import Family
from wftool.quant.bit_experts import BitExperts
from wftool.quant.bitlinear import BitLinear, RMSNorm

SubNormPlacement = Literal["paper", "all", "none"]
SUB_NORM_PLACEMENTS = ("paper", "all", "none")
# The official BitDistill configs use this eps for the per-projection norms of "all".
ALL_PLACEMENT_EPS = 1e-8
# Every module type whose forward sees ternary weights (warm-up mix, float activations).
QUANTIZED_MODULES = (BitLinear, BitExperts)


@dataclass
class ConversionReport:
    """What convert changed, for the summary a user sees and for tests."""

    # Module paths of BitLinear layers; for routed experts the 3-D tensors themselves
    # (`...experts.gate_up_proj`, `...experts.down_proj`), each holding every expert.
    quantized: list[str] = field(default_factory=list)
    sub_norms: list[str] = field(default_factory=list)
    kept_full_precision: list[str] = field(default_factory=list)
    quantized_params: int = 0
    total_params: int = 0


def decoder_layers(model: nn.Module, family: Family) -> nn.ModuleList:
    return model.get_submodule(family.layers)


def convert_to_bitnet(
    model: nn.Module,
    family: Family,
    sub_norm: SubNormPlacement = "paper",
    sub_norm_eps: float | None = None,
) -> ConversionReport:
    """Replace projections by BitLinear and insert SubLN, in place. Returns what changed."""
    if sub_norm not in SUB_NORM_PLACEMENTS:
        raise ValueError(f"sub_norm must be one of {SUB_NORM_PLACEMENTS}, got {sub_norm!r}")
    if any(isinstance(m, QUANTIZED_MODULES) for m in model.modules()):
        raise ValueError("model already contains BitLinear layers (converted twice?)")
    if sub_norm == "all" and family.experts is not None:
        raise WftError(f"sub_norm 'all' is not supported for mixture-of-experts models "
                       f"({family.name}) yet", "convert with convert.sub_norm=paper or none")
    config = model.config
    if sub_norm_eps is None:
        sub_norm_eps = ALL_PLACEMENT_EPS if sub_norm == "all" else config.rms_norm_eps
    report = ConversionReport()
    layers_path = family.layers
    routers = set()
    for index, layer in enumerate(decoder_layers(model, family)):
        prefix = f"{layers_path}.{index}"
        sparse = family.is_sparse_layer(layer)
        for block_name, proj_name in family.layer_projections(sparse):
            block = layer.get_submodule(block_name)
            linear = getattr(block, proj_name)
            norm_eps = sub_norm_eps if sub_norm == "all" else None
            setattr(block, proj_name, BitLinear.from_linear(linear, input_norm_eps=norm_eps))
            report.quantized.append(f"{prefix}.{block_name}.{proj_name}")
            report.quantized_params += linear.weight.numel()
            if norm_eps:
                report.sub_norms.append(f"{prefix}.{block_name}.{proj_name}.input_norm")
        if sub_norm == "paper":
            for slot in family.layer_sub_norms(sparse):
                block = layer.get_submodule(slot.parent)
                projection: BitLinear = getattr(block, slot.projection)
                weight = projection.weight
                norm = RMSNorm(projection.in_features, sub_norm_eps).to(
                    device=weight.device, dtype=weight.dtype
                )
                block.add_module(slot.name, norm)
                projection.use_sub_norm(norm)
                report.sub_norms.append(f"{prefix}.{slot.parent}.{slot.name}")
        if sparse:
            _convert_experts(layer, family, prefix, sub_norm_eps if sub_norm == "paper" else None,
                             report)
            routers.update(f"{prefix}.{router}" for router in family.routers)
    quantized = set(report.quantized)
    for name, module in model.named_modules():
        if name in routers or (
            isinstance(module, (nn.Linear, nn.Embedding)) and name not in quantized
        ):
            report.kept_full_precision.append(name)
    report.total_params = sum(p.numel() for p in model.parameters())
    return report


def _convert_experts(
    layer: nn.Module, family: Family, prefix: str, sub_norm_eps: float | None,
    report: ConversionReport,
) -> None:
    """Routed experts -> BitExperts (with its per-expert SubLN when `sub_norm_eps` is set)."""
    parent_path, _, name = family.experts.rpartition(".")
    parent = layer.get_submodule(parent_path)
    experts = BitExperts.from_experts(getattr(parent, name), sub_norm_eps)
    setattr(parent, name, experts)
    path = f"{prefix}.{family.experts}"
    for tensor in ("gate_up_proj", "down_proj"):
        report.quantized.append(f"{path}.{tensor}")
        report.quantized_params += getattr(experts, tensor).numel()
    if experts.ffn_sub_norm is not None:
        report.sub_norms.append(f"{path}.ffn_sub_norm")


def set_quant_mix(model: nn.Module, mix: float) -> None:
    """Set the quantization warm-up blend on every BitLinear and BitExperts (1 = fully
    ternary)."""
    for module in model.modules():
        if isinstance(module, QUANTIZED_MODULES):
            module.set_quant_mix(mix)


def current_quant_mix(model: nn.Module) -> float:
    """The warm-up blend the model's quantized layers use (1.0 for a model without any)."""
    for module in model.modules():
        if isinstance(module, QUANTIZED_MODULES):
            return float(module.quant_mix)
    return 1.0


@contextmanager
def float_activations(model: nn.Module):
    """Within the block, BitLinear and BitExperts layers keep activations in floating point
    (ternary weights only): the reference for runtimes that do not quantize activations."""
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED_MODULES)]
    try:
        for layer in layers:
            layer.quantize_input = False
        yield model
    finally:
        for layer in layers:
            layer.quantize_input = True


def bitlinear_layers(model: nn.Module) -> dict[str, BitLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}
