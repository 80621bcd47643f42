"""`wft convert`: full-precision causal LM -> BitLinear + SubLN student directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from wftool.errors import WftError
from wftool.export.gguf_target import (BITS_PER_WEIGHT, ROW_MULTIPLE, plan_gguf_export,
                                       ternary_matrices)
from wftool.model.checkpoint import TernaryMetadata, save_model_dir
from wftool.model.families import Family, family_for_model_type
from wftool.model.loading import load_source_model
from wftool.model.moe_from_dense import check_moe_equals_dense, dense_to_moe, equality_tolerance
from wftool.model.surgery import ConversionReport, convert_to_bitnet, set_quant_mix
from wftool.recipe.schema import MoeFromDense, Recipe
from wftool.train.remote import stage_url, upload_dir


@dataclass
class ConvertResult:
    output: Path
    report: ConversionReport
    family: str
    gguf_arch: str  # the llama.cpp architecture its SubLN placement exports to
    gguf_type: str  # the recipe's export.type, which the check below is for
    gguf_blockers: list[str]  # why `wft export-gguf` would refuse it (empty: it fits)
    row_misfit: int | None = None  # a projection row length the export type cannot hold
    moe_logit_diff: float | None = None  # convert.moe: MoE vs dense logits, relative


def default_convert_output(recipe: Recipe) -> Path:
    return Path(recipe.convert.output or f"{recipe.stage_dir('convert')}/final")


def run_convert(recipe: Recipe, output: Path | None = None, force: bool = False) -> ConvertResult:
    """Load the recipe's model, convert it and save the student directory."""
    output = Path(output) if output else default_convert_output(recipe)
    if output.exists() and not output.is_dir():
        raise WftError(f"output {output} is a file, not a directory",
                       "pass --output DIR (a new or existing directory)")
    if output.exists() and any(output.iterdir()) and not force:
        raise WftError(
            f"output {output} already exists", "pass --force to replace it, or --output DIR"
        )
    model, tokenizer, family = load_source_model(recipe.model)
    stage = recipe.convert
    moe_logit_diff = None
    if stage.moe is not None:
        model, family, moe_logit_diff = _dense_to_checked_moe(model, stage.moe)
    report = convert_to_bitnet(model, family, stage.sub_norm, stage.sub_norm_eps)
    sub_norm_eps = stage.sub_norm_eps
    if sub_norm_eps is None and report.sub_norms:
        sub_norm_eps = _first_sub_norm_eps(model)
    # A recipe with a quantization warm-up starts the student's ramp at the latent weights.
    start_mix = 0.0 if recipe.quantization.warmup_steps else 1.0
    set_quant_mix(model, start_mix)
    meta = TernaryMetadata(family.name, stage.sub_norm, sub_norm_eps, quant_mix=start_mix)
    save_model_dir(model, tokenizer, output, meta)
    if recipe.sync_to:
        upload_dir(output, stage_url(recipe.sync_to, recipe.name, "convert"))
    # The same plan `wft export-gguf` makes, for the type the recipe exports.
    export_type = recipe.export.type
    target, blockers = plan_gguf_export(model, family, stage.sub_norm, meta.quant_mix,
                                        export_type, tokenizer)
    arch = target.arch if target else "bitnet"  # no architecture fits: the paper's is nearest
    multiple = ROW_MULTIPLE.get(export_type)
    misfit = next((shape[-1] for _, shape in ternary_matrices(model)
                   if multiple and shape[-1] % multiple), None)
    return ConvertResult(output, report, family.name, arch, export_type,
                         [b.reason for b in blockers], misfit, moe_logit_diff)


def _dense_to_checked_moe(dense, moe: MoeFromDense) -> tuple[object, Family, float]:
    """(MoE model, its family, relative logit difference) for `convert.moe`: the dense model
    as a Mixtral whose experts copy its FFN, refused unless it computes the same logits."""
    model = dense_to_moe(dense, moe.experts, moe.top_k)
    diff = check_moe_equals_dense(dense, model)
    tolerance = equality_tolerance(model.dtype)
    if not diff <= tolerance:  # `not <=` refuses NaN too
        raise WftError(
            f"convert.moe: the {moe.experts}-expert model's logits differ from the dense "
            f"model's by {diff:.1e} (relative; at most {tolerance:.0e} expected)",
            "the dense-to-MoE mapping is wrong for this model; remove convert.moe",
        )
    return model, family_for_model_type(model.config.model_type), diff


def _first_sub_norm_eps(model) -> float:
    from wftool.quant.bitlinear import RMSNorm

    return next(m.eps for m in model.modules() if isinstance(m, RMSNorm))


def print_convert_summary(result: ConvertResult, recipe: Recipe, console: Console) -> None:
    report = result.report
    table = Table(title=f"wft convert: {recipe.name}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("family", result.family)
    moe = recipe.convert.moe
    if moe is not None and result.moe_logit_diff is not None:
        table.add_row("moe", f"{moe.experts} experts, top-{moe.top_k}, logits equal the dense "
                             f"model's (max rel diff {_tiny_number(result.moe_logit_diff)})")
    table.add_row(
        "BitLinear",
        f"{len(report.quantized)} projections, {report.quantized_params:,} of "
        f"{report.total_params:,} parameters ternary "
        f"({100 * report.quantized_params / max(report.total_params, 1):.1f} %)",
    )
    table.add_row("SubLN", f"{recipe.convert.sub_norm}: {len(report.sub_norms)} RMSNorms inserted")
    if report.sub_norms:
        table.add_row("", "e.g. " + ", ".join(report.sub_norms[:2]))
    table.add_row("full precision", ", ".join(report.kept_full_precision) or "-")
    # Storage of the projections: latent fp32 for training vs the recipe's export type.
    export_mb = report.quantized_params * BITS_PER_WEIGHT[result.gguf_type] / 8 / 1e6
    latent = f"{report.quantized_params * 4 / 1e6:.1f} MB as fp32"
    if result.row_misfit:  # no size for a file that cannot be written
        size = (f"{latent}; {result.gguf_type.upper()} (export.type) cannot hold rows of "
                f"{result.row_misfit}")
    else:
        size = f"{latent} -> {export_mb:.1f} MB as {result.gguf_type.upper()} (export.type)"
    table.add_row("ternary size", size)
    target = f"llama.cpp {result.gguf_arch}"
    if result.gguf_blockers:
        gguf = f"{target}: no (" + "; ".join(result.gguf_blockers) + ")"
    else:
        gguf = f"{target}: ok as {result.gguf_type.upper()} (export.type)"
    table.add_row("export", gguf)
    table.add_row("saved to", str(result.output))
    console.print(table)


def _tiny_number(value: float) -> str:
    """3e-07 as "3e-7", and 0 as "0"."""
    return "0" if value == 0 else f"{value:.0e}".replace("e-0", "e-")
