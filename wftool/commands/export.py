"""`wft export-gguf`: a trained student -> GGUF for llama.cpp, validated by reading it back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from wftool.errors import WftError
from wftool.export.gguf_bitnet import bitnet_export_problems, write_bitnet_gguf
from wftool.export.validate import check_gguf_tensors
from wftool.model.checkpoint import load_model_dir
from wftool.model.families import family_by_name
from wftool.recipe.schema import Recipe
from wftool.train.stages import final_dir

# Newest first: the stage whose output a recipe export takes.
EXPORT_SOURCE_STAGES = ("distill", "pretrain", "layerwise", "convert")
WRITABLE_TYPES = ("tq1_0", "tq2_0", "f16", "bf16")


@dataclass
class ExportResult:
    path: Path
    source: Path
    export_type: str
    tensors: int
    ternary: int
    size_mb: float
    problems: list[str]


def export_source(recipe: Recipe) -> Path:
    """The newest stage output of a recipe."""
    for stage in EXPORT_SOURCE_STAGES:
        candidate = final_dir(recipe, stage)
        if (candidate / "config.json").exists():
            return candidate
    raise WftError(f"{recipe.name} has no trained or converted model to export yet",
                   "run `wft pipeline <recipe>` (or at least `wft convert`) first")


def run_export(source: Path, export_type: str, output: Path | None, validate: bool,
               name: str) -> ExportResult:
    if export_type not in WRITABLE_TYPES:
        raise WftError(
            f"--type {export_type} is not available yet; available: {', '.join(WRITABLE_TYPES)}"
        )
    model, tokenizer, meta = load_model_dir(source)
    if meta is None:
        raise WftError(f"{source} is a full-precision model, not a wft student",
                       "llama.cpp's own convert_hf_to_gguf.py exports full-precision models")
    family = family_by_name(meta.family)
    problems = bitnet_export_problems(model, family, meta.sub_norm, meta.quant_mix, export_type)
    if problems:
        raise WftError(
            f"{source} cannot be written exactly as a llama.cpp `bitnet` {export_type} GGUF:\n  "
            + "\n  ".join(problems),
            "Qwen3 / untied / `all`-placement students run with `wft serve --backend torch`; "
            "rows that are not multiples of 256 fit `--type f16`",
        )
    output = Path(output) if output else source.parent / f"{name}-{export_type}.gguf"
    written = write_bitnet_gguf(model, tokenizer, family, export_type, output, name)
    found = check_gguf_tensors(output, model, family, written) if validate else []
    return ExportResult(output, source, export_type, len(written),
                        sum(t.kind == "ternary" for t in written),
                        output.stat().st_size / 1e6, found)


def print_export_report(result: ExportResult, validated: bool, console: Console) -> None:
    table = Table(title=f"wft export-gguf: {result.path}", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("from", str(result.source))
    table.add_row("architecture", f"bitnet, {result.export_type.upper()}")
    table.add_row("tensors", f"{result.tensors} ({result.ternary} ternary, each with an F32 scale)")
    table.add_row("size", f"{result.size_mb:.2f} MB")
    if not validated:
        table.add_row("read-back", "skipped (--no-validate)")
    elif result.problems:
        table.add_row("read-back", "[red]FAILED[/]: " + "; ".join(result.problems[:5]))
    else:
        table.add_row("read-back", "ok: names, shapes, every ternary value exact")
    console.print(table)
