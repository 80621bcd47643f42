"""`wft export-gguf`: a trained student -> GGUF for llama.cpp (or BitNet.cpp for I2_S),
checked by reading it back (and running it in llama.cpp) before it replaces the output."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wftool.atomic import remove_leftovers, temporary_sibling
from wftool.errors import WftError
from wftool.export.gguf_target import (
    EXPORT_TYPES,
    Blocker,
    GgufTarget,
    plan_gguf_export,
)
from wftool.export.gguf_writer import write_gguf
from wftool.export.validate import (
    VALIDATION_PROMPTS,
    check_gguf_tensors,
    compare_with_llamacpp,
)
from wftool.model.checkpoint import load_model_dir, model_directory
from wftool.model.families import family_by_name
from wftool.recipe.schema import Recipe
from wftool.runtime.llamacpp import llamacpp_available
from wftool.stage_registry import final_dir, newest_first

# Newest first: the stage whose output a recipe export takes.
EXPORT_SOURCE_STAGES = tuple(stage.name for stage in newest_first())
DEFAULT_DIRECTORY_TYPE = "tq2_0"  # a model directory without a saved recipe naming a type


@dataclass
class ExportRequest:
    """What `wft export-gguf SOURCE` exports, resolved from a recipe or a model directory."""

    model_dir: Path
    export_type: str
    output: Path
    validate: bool
    name: str  # general.name in the file


@dataclass
class ExportResult:
    path: Path  # the output; written only if every check that ran passed
    source: Path
    target: GgufTarget
    tensors: int
    ternary: int
    size_mb: float
    validated: bool
    read_back: list[str]  # problems found re-reading the file
    llamacpp: dict | None = None  # logits comparison, when llama-cpp-python ran the file
    llamacpp_error: str | None = None  # why llama.cpp could not load the file
    notes: list[tuple[str, str]] = field(default_factory=list)  # (row, text) for the report

    @property
    def export_type(self) -> str:
        return self.target.export_type

    @property
    def problems(self) -> list[str]:
        """Every failed check; the file was not written if there is any."""
        found = list(self.read_back)
        if self.llamacpp is not None:
            found += self.llamacpp["problems"]
        if self.llamacpp_error:
            found.append(f"llama.cpp cannot load the file: {self.llamacpp_error}")
        return found


def export_source(recipe: Recipe) -> Path:
    """The newest stage output of a recipe."""
    for stage in EXPORT_SOURCE_STAGES:
        candidate = final_dir(recipe, stage)
        if (candidate / "config.json").exists():
            return candidate
    raise WftError(f"{recipe.name} has no trained or converted model to export yet",
                   "run `wft pipeline <recipe>` (or at least `wft convert`) first")


def default_gguf_path(folder: Path, name: str, export_type: str) -> Path:
    """Where an export goes unless told: `<folder>/<name>-<type>.gguf`."""
    return Path(folder) / f"{name}-{export_type.lower()}.gguf"


def recipe_gguf_path(recipe: Recipe, export_type: str | None = None) -> Path:
    """A recipe's export: `export.output`, else `<output_dir>/<name>/<name>-<type>.gguf`."""
    if recipe.export.output:
        return Path(recipe.export.output)
    return default_gguf_path(Path(recipe.output_dir) / recipe.name, recipe.name,
                             export_type or recipe.export.type)


def resolve_export(source: str, overrides: list[str] | None = None,
                   export_type: str | None = None, output: Path | None = None,
                   validate: bool | None = None, force: bool = True) -> ExportRequest:
    """A recipe exports its newest stage output as its `export` section says; a model
    directory (or a stage folder holding `final/`; overrides refused) exports beside itself
    as the recipe saved with it says (name, export.type; else tq2_0). Explicit arguments win
    over both. `force=False` (the command line without --force) refuses an output file that
    exists already, as `wft convert` refuses a non-empty output directory."""
    request = _resolve_export(source, overrides, export_type, output, validate)
    if not force and request.output.exists() and not request.output.is_dir():
        raise WftError(f"{request.output} exists already; wft export-gguf does not replace it "
                       "unless told to",
                       "pass --force to replace it, or choose another --output")
    return request


def _resolve_export(source: str, overrides: list[str] | None, export_type: str | None,
                    output: Path | None, validate: bool | None) -> ExportRequest:
    export_type = export_type.lower() if export_type else None
    path = model_directory(source)
    if path is not None:
        if overrides:
            raise WftError("overrides apply to recipes, not to a model directory",
                           "pass options instead, e.g. --type f16 (or export a recipe)")
        saved = _saved_recipe(path)
        name = _model_name(path, saved)
        saved_type = (saved.get("export") or {}).get("type")
        export_type = export_type or (saved_type if saved_type in EXPORT_TYPES
                                      else DEFAULT_DIRECTORY_TYPE)
        return ExportRequest(path, export_type,
                             Path(output) if output else default_gguf_path(path.parent, name,
                                                                           export_type),
                             True if validate is None else validate, name)
    from wftool.recipe.load import load_recipe

    recipe = load_recipe(source, overrides or [], stage="export")
    export_type = export_type or recipe.export.type
    return ExportRequest(export_source(recipe), export_type,
                         Path(output) if output else recipe_gguf_path(recipe, export_type),
                         recipe.export.validate_export if validate is None else validate,
                         recipe.name)


def _saved_recipe(model_dir: Path) -> dict:
    """The recipe saved beside a stage's weights, as plain YAML ({} if none or unreadable)."""
    saved = model_dir / "recipe.yaml"
    if not saved.is_file():
        return {}
    from wftool.recipe.load import read_recipe_yaml

    try:
        recipe = read_recipe_yaml(saved)
    except WftError:
        return {}
    return recipe if isinstance(recipe, dict) else {}


def _model_name(model_dir: Path, saved: dict) -> str:
    """The saved recipe's name; else the directory's name, skipping `final` and stage names
    (runs/tiny/convert/final -> tiny)."""
    name = saved.get("name")
    if isinstance(name, str) and name:
        return name
    parts = [p for p in model_dir.resolve().parts[1:]
             if p not in ("final", *EXPORT_SOURCE_STAGES)]
    return parts[-1] if parts else "model"


def validation_prompts(source: Path, tokenizer, n: int = 3, max_tokens: int = 96) -> list[str]:
    """Held-out documents of the data the model was trained on (from the recipe saved beside
    its weights), so logits are compared where the model is confident. Only the synthetic and
    local-file sources are read (an export never goes to the network); VALIDATION_PROMPTS
    where there are none or anything fails."""
    try:
        prompts = _held_out_prompts(source, tokenizer, n, max_tokens)
    except Exception:  # noqa: BLE001 - any failure here only costs the better prompts
        prompts = []
    return prompts or list(VALIDATION_PROMPTS)


def _held_out_prompts(source: Path, tokenizer, n: int, max_tokens: int) -> list[str]:
    from wftool.data.sources import DocumentMixer
    from wftool.recipe.load import load_recipe

    if not (source / "recipe.yaml").exists():
        return []
    data = load_recipe(str(source / "recipe.yaml")).data

    def local(sources):  # never a download while exporting
        return [s for s in sources or [] if s.synthetic or s.files]

    held_out = local(data.eval) if data.eval else local(data.sources)
    if data.format != "text" or not data.holds_out or not held_out:
        return []
    update = {"eval": held_out} if data.eval else {"sources": held_out}
    mixer = DocumentMixer(data.model_copy(update=update), "eval")
    prompts = []
    for _ in range(n):
        ids = tokenizer(mixer.next_document(), add_special_tokens=False)["input_ids"]
        if ids:
            prompts.append(tokenizer.decode(ids[:max_tokens]))
    return prompts


def run_export(source: Path, export_type: str, output: Path | None, validate: bool,
               name: str, threads: int = 1) -> ExportResult:
    """Plan, write to a temporary file beside `output`, check it (read-back, then llama.cpp
    where installed and able to load the type), and only then move it to `output`. A file
    that fails a check is removed: `output` keeps whatever it held before."""
    export_type = export_type.lower()
    if export_type not in EXPORT_TYPES:
        raise WftError(f"--type {export_type} is not available; available: "
                       f"{', '.join(EXPORT_TYPES)}")
    output = Path(output) if output else default_gguf_path(Path(source).parent, name,
                                                           export_type)
    if output.is_dir():
        raise WftError(f"--output {output} is a directory",
                       f"name a file, e.g. --output {default_gguf_path(output, name, export_type)}")
    model, tokenizer, meta = load_model_dir(source)
    if meta is None:
        raise WftError(f"{source} is a full-precision model, not a wft student",
                       "llama.cpp's own convert_hf_to_gguf.py exports full-precision models")
    if tokenizer is None:
        raise WftError(f"{source} has no tokenizer files; a GGUF file carries its tokenizer",
                       "copy the tokenizer files (tokenizer.json, tokenizer_config.json) of "
                       "the model it was converted from into the directory")
    family = family_by_name(meta.family)
    notes = _runtime_notes(model, meta)
    target, blockers = plan_gguf_export(model, family, meta.sub_norm, meta.quant_mix,
                                        export_type, tokenizer)
    if blockers:
        raise _refusal(source, target, export_type, blockers)
    remove_leftovers(output, ("tmp",))  # what a killed export left beside the output
    tmp = temporary_sibling(output)
    try:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            written = write_gguf(model, tokenizer, family, target, tmp, name)
        except OSError as err:
            raise WftError(f"cannot write {output}: {err.strerror or err}",
                           "check the path, its permissions and the free disk space") from None
        result = ExportResult(output, source, target, len(written),
                              sum(t.kind == "ternary" for t in written),
                              tmp.stat().st_size / 1e6, validate, [], notes=notes)
        if validate:
            result.read_back = check_gguf_tensors(tmp, model, target, written)
        if (validate and not result.read_back and target.runtime == "llama.cpp"
                and llamacpp_available()):
            try:
                result.llamacpp = compare_with_llamacpp(tmp, model, tokenizer, export_type,
                                                        threads,
                                                        validation_prompts(source, tokenizer))
            except WftError as err:
                result.llamacpp_error = err.message
        if not result.problems:
            try:
                os.replace(tmp, output)
            except OSError as err:
                raise WftError(f"cannot write {output}: {err.strerror or err}") from None
    finally:
        with contextlib.suppress(OSError):  # gone already, or its folder could not be made
            tmp.unlink(missing_ok=True)
    return result


def _runtime_notes(model, meta) -> list[tuple[str, str]]:
    """What of the student a GGUF runtime does not do, said in the report. Q-Sparse is
    switched off here, so the logits llama.cpp is checked against are the dense ones it
    computes."""
    notes = []
    if meta.q_sparsity:
        from wftool.quant.q_sparse import set_q_sparsity

        set_q_sparsity(model, 0.0)
        notes.append(("Q-Sparse", f"q_sparsity {meta.q_sparsity:g} is not in the file: "
                      "llama.cpp multiplies dense activations (`wft serve --backend torch` "
                      "keeps the sparsity)"))
    if meta.diffusion:
        notes.append(("decoding", "autoregressive (the mask token is an ordinary extra "
                      "token in llama.cpp); diffusion and self-speculative decoding run in "
                      "wft's torch runtime: `wft serve --backend torch`"))
    return notes


def _refusal(source: Path, target: GgufTarget | None, export_type: str,
             blockers: list[Blocker]) -> WftError:
    """Every blocker with its own fix, in one error."""
    arch = f"`{target.arch}`" if target else "any"
    runtime = target.runtime if target else "llama.cpp"
    lines = "".join(f"\n  - {b.reason}\n    fix: {b.fix}" for b in blockers)
    return WftError(f"{source} cannot be written exactly as a {runtime} {arch} {export_type} "
                    f"GGUF:{lines}")


def print_export_report(result: ExportResult, console: Console) -> None:
    target = result.target
    title = escape(str(result.path))
    if result.problems:
        title += " [red](not written: a check failed)[/]"
    table = Table(title=f"wft export-gguf: {title}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("from", escape(str(result.source)))
    table.add_row("architecture", f"{target.arch}, {target.export_type.upper()}")
    table.add_row("runtime", "BitNet.cpp only (extern/BitNet, see extern/README.md)"
                  if target.runtime == "BitNet.cpp" else "llama.cpp")
    table.add_row("tensors", f"{result.tensors} ({result.ternary} ternary)")
    table.add_row("delta", target.delta_storage)
    table.add_row("size", f"{result.size_mb:.2f} MB")
    table.add_row("read-back", _read_back_text(result))
    table.add_row("llama.cpp", _llamacpp_text(result))
    for row, text in result.notes:
        table.add_row(row, text)
    console.print(table)


def _read_back_text(result: ExportResult) -> str:
    if not result.validated:
        return "skipped (--no-validate)"
    if result.read_back:
        return "[red]FAILED[/]: " + escape("; ".join(result.read_back[:5]))
    return "ok: names, shapes, types, every ternary value exact"


def _llamacpp_text(result: ExportResult) -> str:
    if not result.validated:
        return "skipped (--no-validate)"
    if result.target.runtime == "BitNet.cpp":
        return "skipped: I2_S loads only in BitNet.cpp; nothing installed here can load it"
    if result.read_back:
        return "not run (the read-back failed)"
    if result.llamacpp_error:
        return f"[red]FAILED[/]: cannot load the file: {escape(result.llamacpp_error)}"
    stats = result.llamacpp
    if stats is None:
        return "not checked (pip install 'wftool[llamacpp]' to compare logits)"
    rel_rms = "n/a (no prompt compared)" if math.isnan(stats["rel_rms"]) else \
        f"{stats['rel_rms']:.2e}"
    top1 = "n/a (no decisive position)" if math.isnan(stats["top1"]) else \
        f"{100 * stats['top1']:.1f} %"
    text = (f"logits rel RMS {rel_rms}, top-1 {top1}, "
            f"decode {stats['decode_tok_s']:.1f} tok/s")
    if stats["problems"]:
        return f"[red]FAILED[/]: {escape('; '.join(stats['problems']))} ({text})"
    return text
