"""`wft export-gguf`: a trained student -> GGUF for llama.cpp (or BitNet.cpp for I2_S),
validated by reading it back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from wftool.errors import WftError
from wftool.export.gguf_target import EXPORT_TYPES, GgufTarget, plan_gguf_export
from wftool.export.gguf_writer import write_gguf
from wftool.export.validate import (
    VALIDATION_PROMPTS,
    check_gguf_tensors,
    compare_with_llamacpp,
    llamacpp_available,
)
from wftool.model.checkpoint import load_model_dir
from wftool.model.families import family_by_name
from wftool.recipe.schema import Recipe
from wftool.train.stages import final_dir

# Newest first: the stage whose output a recipe export takes.
EXPORT_SOURCE_STAGES = ("distill", "pretrain", "layerwise", "convert")
WRITABLE_TYPES = EXPORT_TYPES


@dataclass
class ExportResult:
    path: Path
    source: Path
    target: GgufTarget
    tensors: int
    ternary: int
    size_mb: float
    problems: list[str]
    llamacpp: dict | None = None  # logits comparison, when llama-cpp-python is installed

    @property
    def export_type(self) -> str:
        return self.target.export_type


def export_source(recipe: Recipe) -> Path:
    """The newest stage output of a recipe."""
    for stage in EXPORT_SOURCE_STAGES:
        candidate = final_dir(recipe, stage)
        if (candidate / "config.json").exists():
            return candidate
    raise WftError(f"{recipe.name} has no trained or converted model to export yet",
                   "run `wft pipeline <recipe>` (or at least `wft convert`) first")


def validation_prompts(source: Path, tokenizer, n: int = 3, max_tokens: int = 96) -> list[str]:
    """Held-out documents of the data the model was trained on (from the recipe saved beside
    its weights), so logits are compared where the model is confident; generic prompts
    otherwise."""
    from wftool.data.sources import DocumentMixer
    from wftool.recipe.load import load_recipe

    if not (source / "recipe.yaml").exists():
        return list(VALIDATION_PROMPTS)
    try:
        recipe = load_recipe(str(source / "recipe.yaml"))
    except WftError:
        return list(VALIDATION_PROMPTS)
    data = recipe.data
    if data.format != "text" or data.eval_fraction <= 0:
        return list(VALIDATION_PROMPTS)
    mixer = DocumentMixer(data, "eval")
    prompts = []
    for _ in range(n):
        ids = tokenizer(mixer.next_document(), add_special_tokens=False)["input_ids"]
        prompts.append(tokenizer.decode(ids[:max_tokens]))
    return prompts


def run_export(source: Path, export_type: str, output: Path | None, validate: bool,
               name: str, threads: int = 1) -> ExportResult:
    if export_type not in WRITABLE_TYPES:
        raise WftError(
            f"--type {export_type} is not available; available: {', '.join(WRITABLE_TYPES)}"
        )
    model, tokenizer, meta = load_model_dir(source)
    if meta is None:
        raise WftError(f"{source} is a full-precision model, not a wft student",
                       "llama.cpp's own convert_hf_to_gguf.py exports full-precision models")
    family = family_by_name(meta.family)
    target, problems = plan_gguf_export(model, family, meta.sub_norm, meta.quant_mix,
                                        export_type)
    if problems:
        arch = f"`{target.arch}`" if target else "any"
        raise WftError(
            f"{source} cannot be written exactly as a llama.cpp {arch} {export_type} GGUF:\n  "
            + "\n  ".join(problems),
            "paper SubLN goes to `bitnet`, convert.sub_norm=none to `llama`; Qwen3, "
            "`all`-placement and untied SubLN students run with `wft serve --backend torch`; "
            "rows that are not multiples of 256 fit `--type f16` (or i2_s: multiples of 128)",
        )
    output = Path(output) if output else source.parent / f"{name}-{export_type}.gguf"
    written = write_gguf(model, tokenizer, family, target, output, name)
    found = check_gguf_tensors(output, model, target, written) if validate else []
    llamacpp = None
    if validate and not found and target.runtime == "llama.cpp" and llamacpp_available():
        prompts = validation_prompts(source, tokenizer)
        llamacpp = compare_with_llamacpp(output, model, tokenizer, export_type, threads, prompts)
        found.extend(llamacpp["problems"])
    return ExportResult(output, source, target, len(written),
                        sum(t.kind == "ternary" for t in written),
                        output.stat().st_size / 1e6, found, llamacpp)


def print_export_report(result: ExportResult, validated: bool, console: Console) -> None:
    target = result.target
    table = Table(title=f"wft export-gguf: {result.path}", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("from", str(result.source))
    table.add_row("architecture", f"{target.arch}, {target.export_type.upper()}")
    table.add_row("runtime", "BitNet.cpp only (extern/BitNet, see extern/README.md)"
                  if target.runtime == "BitNet.cpp" else "llama.cpp")
    table.add_row("tensors", f"{result.tensors} ({result.ternary} ternary)")
    table.add_row("delta", target.delta_storage)
    table.add_row("size", f"{result.size_mb:.2f} MB")
    if not validated:
        table.add_row("read-back", "skipped (--no-validate)")
    elif result.problems:
        table.add_row("read-back", "[red]FAILED[/]: " + "; ".join(result.problems[:5]))
    else:
        table.add_row("read-back", "ok: names, shapes, every ternary value exact")
    if validated and target.runtime == "BitNet.cpp":
        table.add_row("llama.cpp", "skipped: I2_S loads only in BitNet.cpp; nothing "
                      "installed here can load it")
    elif validated and result.llamacpp is None:
        table.add_row("llama.cpp", "not checked (pip install 'wftool[llamacpp]' to compare logits)")
    elif result.llamacpp is not None:
        stats = result.llamacpp
        table.add_row("llama.cpp", f"logits rel RMS {stats['rel_rms']:.2e}, top-1 "
                      f"{100 * stats['top1']:.1f} %, decode {stats['decode_tok_s']:.1f} tok/s")
    console.print(table)
