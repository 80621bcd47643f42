"""`wft eval`: teachers, ternary students and GGUF exports on the same held-out tokens.

What runs where: `wftool.eval.targets` (command line -> models), `wftool.eval.heldout` (the
data), `wftool.eval.llamacpp` (GGUF files), `wftool.eval.harness` (lm-eval tasks).

One definition of every number, whatever runs the model (`wftool.train.evaluation`):
- loss: mean next-token negative log-likelihood in nats, every scored target token weighted
  equally (summed over all rows, then divided by the token count); ppl = exp(loss).
- text: every token of the packed held-out rows after each row's first is scored.
- task: only the answer tokens (and the EOS that closes the answer) are scored; accuracy is
  the share of examples whose answer tokens, EOS excluded, are all the model's argmax under
  teacher forcing (prompt + the gold answer so far), i.e. exact match of greedy decoding.
  Beside it: the judged examples (`examples`) and the majority-class floor
  (`majority_accuracy`: always giving their most frequent answer); the table notes models
  within one example of the floor, and ties.
- each held-out document counts once: a recipe's eval split is read once, however many
  --batches are asked for (the table and the JSON say how many documents were scored).
A wft student runs its quantized forward (ternary weights, int8 activations, the
quantization mix it was saved with); a GGUF file runs in llama.cpp with its own tokenizer,
whose token ids must equal those of the first model in the table (else it is refused).
A model a recipe scan found but that cannot run is skipped with a note; if none runs, that
is an error, never an empty table.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from wftool.atomic import disk_full_error, is_disk_full, write_text_atomic
from wftool.errors import WftError
from wftool.eval.heldout import (
    HeldOutSet,
    SetBatches,
    heldout_sets,
    judged_examples,
    same_tokens,
    scored_tokens,
)
from wftool.eval.targets import EvalTarget, resolve_sources
from wftool.model.loading import resolve_device
from wftool.train.evaluation import (
    accuracy_cell,
    accuracy_notes,
    accuracy_basis,
    majority_floor,
    MODEL_MIN_WIDTH,
)

LM_EVAL_MAX_LENGTH = 2048  # longest sequence lm-eval scores (llama.cpp keeps all its logits)


@dataclass
class EvalOptions:
    text: Path | None = None
    task: Path | None = None
    batches: int | None = None
    batch_size: int = 8
    seq_len: int | None = None
    lm_eval: list[str] = field(default_factory=list)
    limit: int | None = None
    threads: int = 1
    device: str = "auto"
    decode_tokens: int = 32  # unified students: tokens each decoding mode makes (0: skip)


@dataclass
class EvalReport:
    sets: list[dict]
    models: list[dict]
    notes: list[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# ---- running -----------------------------------------------------------------------------
def run_eval(items: list[str], options: EvalOptions, console: Console) -> EvalReport:
    """Evaluate every source on the same held-out tokens (and lm-eval tasks, if asked)."""
    device = resolve_device(options.device)  # a bad --device is the user's, whatever skips
    if options.lm_eval and not lm_eval_available():
        raise WftError("--lm-eval needs the lm-eval-harness package (lm_eval), which is not "
                       "installed", "pip install lm-eval")
    targets, recipe = resolve_sources(items)
    sets = heldout_sets(recipe, options.text, options.task, options.seq_len)
    if not sets and not options.lm_eval:
        raise WftError(
            "no held-out data to evaluate on",
            "pass --text FILE and/or --task FILE, or a recipe (or a checkpoint with its "
            "recipe.yaml) whose data holds documents out (data.eval, or "
            "data.eval_fraction > 0)")
    _quiet_datasets()
    tasks = None
    if options.lm_eval:  # an unknown task or an unreachable data set is no model's fault
        from wftool.eval.harness import load_tasks

        with console.status("loading lm-eval tasks ..."):
            tasks = load_tasks(options.lm_eval)
    # Per set kind: the first model actually evaluated, and the batches every other must equal.
    reference: dict[str, tuple[str, SetBatches]] = {}
    models, notes = [], []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True) as progress:
        for target in targets:
            start = time.perf_counter()
            try:
                row, held = _evaluate_target(target, sets, tasks, options, device, reference,
                                             progress)
            except WftError as err:
                if not target.found:
                    raise
                hint = f"; {err.hint}" if err.hint else ""
                notes.append(f"{target.label}: skipped ({err.message}{hint})")
                continue
            for kind, batches in held.items():  # a skipped model never becomes the reference
                reference.setdefault(kind, (target.label, batches))
            row["seconds"] = round(time.perf_counter() - start, 2)
            models.append(row)
            console.print(f"[dim]evaluated {target.label} in {row['seconds']:.1f} s[/]")
    if not models:
        raise WftError("no model could be evaluated:\n  " + "\n  ".join(notes),
                       "each line says why; fix that, or name model directories and .gguf files")
    described = []
    for s in sets:
        _, held = reference.get(s.kind, (None, SetBatches([], 0, False)))
        entry = {"kind": s.kind, "origin": s.origin, "seq_len": s.seq_len,
                 "batches": len(held.batches), "documents": held.documents,
                 "complete": held.complete, "tokens": scored_tokens(held.batches)}
        if s.task:
            entry["examples"] = judged_examples(held.batches)
            entry["majority_accuracy"] = majority_floor(held.batches).get("majority_accuracy")
        described.append(entry)
        asked = options.batches or (s.data.eval_batches if s.data is not None else None)
        if s.data is not None and held.complete and asked and len(held.batches) < asked:
            noun = "examples" if s.task else "documents"
            notes.append(f"{s.kind}: {s.origin} holds {held.documents} {noun}, "
                         f"{len(held.batches)} of the {asked} batches asked for; each was "
                         "scored once")
    return EvalReport(described, models, notes)


def _quiet_datasets() -> None:
    """The table is the output: no per-file progress bars from `datasets`."""
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()


def lm_eval_available() -> bool:
    """Whether lm-eval-harness is installed, without importing it (that takes seconds)."""
    return importlib.util.find_spec("lm_eval") is not None


def _open(target: EvalTarget, sets: list[HeldOutSet], options: EvalOptions, device):
    """(model, tokenizer, weights description) for one target."""
    if target.backend == "llama.cpp":
        from wftool.eval.llamacpp import LlamaCppModel, LlamaCppTokenizer
        from wftool.runtime.llamacpp import gguf_context_length

        # Room for the longest row; lm-eval gets the trained context, up to its maximum.
        harness = min(LM_EVAL_MAX_LENGTH, gguf_context_length(target.location)
                      or LM_EVAL_MAX_LENGTH) if options.lm_eval else 0
        n_ctx = max([64, harness] + [s.seq_len for s in sets])
        model = LlamaCppModel(target.location, n_ctx, options.threads)
        return model, LlamaCppTokenizer(model), model.file_type
    if target.spec is not None:  # a model the recipe names, loaded as training loads it
        from wftool.model.loading import load_source_model

        model, tokenizer, _ = load_source_model(target.spec)
        model, meta = model.to(device), None
    elif target.teacher_dtype is not None:  # the recipe's teacher directory, as distill has it
        from wftool.train.stages import load_teacher

        model, _ = load_teacher(target.location, target.teacher_dtype)
        model, tokenizer, meta = model.to(device), _directory_tokenizer(target.location), None
    else:
        from wftool.model.checkpoint import load_model_dir

        model, tokenizer, meta = load_model_dir(Path(target.location), device=device)
    if tokenizer is None:
        raise WftError(f"{target.location} has no tokenizer files",
                       "copy the tokenizer of the model it came from into the directory")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if meta is None:
        return model, tokenizer, f"FP ({dtype})"
    mix = f", mix {meta.quant_mix:.2f}" if meta.quant_mix < 1 else ""
    return model, tokenizer, f"ternary{mix}"


def _directory_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(Path(path).expanduser())
    except (OSError, ValueError) as err:
        raise WftError(f"cannot load the tokenizer of {path}: {str(err).splitlines()[0]}",
                       "copy the tokenizer of the model it came from into the directory"
                       ) from None


def _evaluate_target(target: EvalTarget, sets: list[HeldOutSet], tasks, options: EvalOptions,
                     device, reference: dict, progress: Progress) -> tuple[dict, dict]:
    """(row, held-out batches per set kind) of one target; running out of (GPU) memory is
    the user's to fix, not a traceback."""
    import torch

    device = device if target.backend == "torch" else None
    try:
        return _evaluate_opened(target, sets, tasks, options, reference, progress, device)
    except torch.OutOfMemoryError:
        raise WftError(
            f"{target.label}: out of memory on {device} (batch size {options.batch_size})",
            "lower --batch-size or --seq-len, or pass --device cpu") from None


def _evaluate_opened(target: EvalTarget, sets: list[HeldOutSet], tasks, options: EvalOptions,
                     reference: dict, progress: Progress, device) -> tuple[dict, dict]:
    from wftool.train.evaluation import evaluate_model

    model, tokenizer, weights = _open(target, sets, options, device)
    row = {"model": target.label, "path": target.location, "backend": target.backend,
           "weights": weights}
    scored: dict[str, SetBatches] = {}
    try:
        for s in sets:
            held = scored[s.kind] = s.batches(tokenizer, options.batch_size, options.batches)
            batches = held.batches
            if s.kind in reference:
                first_label, first = reference[s.kind]
                if not same_tokens(first.batches, batches):
                    raise _tokenizer_mismatch(target, first_label, s)
            bar = progress.add_task(f"{target.label}: {s.kind}", total=len(batches))
            numbers = evaluate_model(model, _Tracked(batches, progress, bar), task=s.task,
                                     device=device or "cpu")
            progress.remove_task(bar)
            row[f"{s.kind}_loss"] = numbers.get("eval_loss")
            row[f"{s.kind}_ppl"] = numbers.get("eval_ppl")
            row[f"{s.kind}_tokens"] = scored_tokens(batches)
            if s.task:
                row["task_accuracy"] = numbers.get("eval_accuracy")
                row["task_examples"] = judged_examples(batches)
                row.update(majority_floor(batches))  # "examples", "majority_accuracy"
        if target.backend == "torch":
            _diffusion_numbers(model, row, scored, options, device or "cpu")
        if tasks is not None:
            from wftool.eval.harness import run_lm_eval

            bar = progress.add_task(f"{target.label}: lm-eval", total=None)
            row["lm_eval"] = run_lm_eval(model, tokenizer, tasks, options.limit,
                                         options.batch_size, _lm_eval_max_length(model),
                                         device or "cpu")
            progress.remove_task(bar)
    finally:
        if target.backend == "llama.cpp":
            model.close()
    return row, scored


def _diffusion_numbers(model, row: dict, scored: dict, options: EvalOptions, device) -> None:
    """A unified student's diffusion mode: held-out diffusion loss and masked-token accuracy
    per set, and each decoding mode's speed and task accuracy."""
    from wftool.model.mask_token import diffusion_settings

    settings = diffusion_settings(model)
    if settings is None:
        return
    from wftool.eval.diffusion import diffusion_scores

    for kind, held in scored.items():
        scores = diffusion_scores(model, held.batches, settings, device)
        row.update({f"{kind}_{key}": value for key, value in scores.items()})
    if options.decode_tokens:
        from wftool.decoding.kv_cache import lookahead_problem
        from wftool.eval.decoding_modes import decoding_report

        problem = lookahead_problem(model, settings.attention)
        if problem:  # e.g. sliding-window layers: decoding ahead cannot be undone
            row["decoding_problem"] = problem
            return

        empty = SetBatches([], 0, False)
        row["decoding"] = decoding_report(model, scored.get("text", empty).batches,
                                          scored.get("task", empty).batches,
                                          new_tokens=options.decode_tokens)


def _lm_eval_max_length(model) -> int:
    """The model's context (training context, or llama.cpp's), at most LM_EVAL_MAX_LENGTH."""
    from wftool.eval.llamacpp import LlamaCppModel

    if isinstance(model, LlamaCppModel):
        limit = min(model.context_length, model.n_ctx)
    else:
        limit = getattr(model.config, "max_position_embeddings", None) or LM_EVAL_MAX_LENGTH
    return min(LM_EVAL_MAX_LENGTH, limit)


def _tokenizer_mismatch(target: EvalTarget, first_label: str, s: HeldOutSet) -> WftError:
    if target.backend == "llama.cpp":
        return WftError(
            f"llama.cpp tokenizes the {s.kind} data of {target.label} differently from the "
            f"tokenizer of {first_label}: the GGUF's tokenizer metadata disagrees, so its "
            "numbers would not be comparable", "re-export the GGUF from the checkpoint")
    return WftError(f"{target.label} tokenizes the {s.kind} data differently from "
                    f"{first_label}; per-token numbers would not be comparable",
                    "evaluate models with different tokenizers in separate runs")


class _Tracked(list):
    """A batch list that advances a progress bar as evaluate_model walks it."""

    def __init__(self, batches, progress: Progress, bar):
        super().__init__(batches)
        self.progress, self.bar = progress, bar

    def __iter__(self):
        for batch in super().__iter__():
            yield batch
            self.progress.advance(self.bar)


# ---- output ------------------------------------------------------------------------------
def check_output(path: Path) -> None:
    """Refuse an --output that cannot be written before any model runs, not after."""
    if path.is_dir():
        raise WftError(f"--output {path} is a directory",
                       f"name a file, e.g. --output {path / 'eval.json'}")
    folder = path.parent  # the nearest folder that exists must take a new file (or folder)
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise WftError(f"--output {path}: {folder} is a file, so no folder can be made there",
                       "pass a path under an existing folder")
    if not os.access(path if path.exists() else folder, os.W_OK):
        raise WftError(f"--output {path}: not writable", "pass a path you can write to")


def save_report(report: EvalReport, path: Path) -> None:
    """Write the JSON report; a failure names the file (the table is already printed)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, report.to_json())  # never a half-written report
    except OSError as err:
        if is_disk_full(err):
            raise disk_full_error("the report", path,
                                  "the table above holds the same numbers") from None
        raise WftError(f"cannot write {path}: {err.strerror or err}",
                       "pass another --output; the table above holds the same numbers"
                       ) from None


HELD_OUT_COLUMNS = (("text loss", "text_loss"), ("text ppl", "text_ppl"),
                    ("task loss", "task_loss"), ("task acc %", "task_accuracy"))


def print_eval_table(report: EvalReport, console: Console) -> None:
    """One table for the held-out sets, one for lm-eval tasks; rows are models."""
    shown = [(t, k) for t, k in HELD_OUT_COLUMNS
             if any(row.get(k) is not None for row in report.models)]
    if shown:
        table = _models_table("wft eval (held-out data)", report.models, shown)
        console.print(table)
        basis = accuracy_basis(report.models)
        if basis:
            console.print(basis, highlight=False)
        for s in report.sets:
            count = ("all " if s["complete"] else "") + f"{s['documents']:,} " + (
                f"examples ({s['examples']:,} judged)" if s["kind"] == "task" else "documents")
            console.print(f"{s['kind']}: {s['origin']}, {count}, {s['tokens']:,} scored tokens "
                          f"in {s['batches']} batches (seq_len {s['seq_len']})", highlight=False)
        for note in accuracy_notes(report.models):
            console.print(f"[yellow]note:[/] {note}", highlight=False)
    if any(row.get("decoding") for row in report.models):
        console.print(decoding_table(report.models))
    if any(row.get("decoding") or row.get("decoding_problem") for row in report.models):
        for note in decoding_notes(report.models):
            console.print(note, highlight=False)
    metrics = list(dict.fromkeys(k for row in report.models for k in row.get("lm_eval", {})
                                 if not k.endswith(":n")))
    if metrics:
        rows = [dict(row, **row.get("lm_eval", {})) for row in report.models]
        console.print(_models_table("lm-eval-harness", rows, [(m, m) for m in metrics]))
        counts = {k.removesuffix(":n"): int(v) for row in report.models
                  for k, v in row.get("lm_eval", {}).items() if k.endswith(":n")}
        console.print("examples: " + ", ".join(f"{t} {n}" for t, n in counts.items()),
                      highlight=False)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)


def _models_table(title: str, rows: list[dict], columns: list[tuple[str, str]]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("model", overflow="fold", min_width=MODEL_MIN_WIDTH)
    table.add_column("weights", no_wrap=True)
    for name in eval_titles(rows, columns):
        table.add_column(name, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(row["model"], row["weights"], *eval_cells(row, rows, columns))
    return table


def eval_titles(rows: list[dict], columns=HELD_OUT_COLUMNS) -> list[str]:
    """Column titles; the accuracy's adds "(n, floor)" when rows were judged on different
    examples (else `accuracy_basis` says them once under the table)."""
    shared = accuracy_basis(rows) is not None
    return [f"{name} (n, floor)" if key == "task_accuracy" and not shared else name
            for name, key in columns]


def eval_cells(row: dict, rows: list[dict], columns=HELD_OUT_COLUMNS) -> list[str]:
    """A report row's numbers as the table prints them (the README's generated table too)."""
    shared = accuracy_basis(rows) is not None
    return [accuracy_cell(row, shared) if key == "task_accuracy" else eval_cell(key, row)
            for _, key in columns]


def eval_cell(key: str, row: dict) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if "loss" in key or ":" in key:
        return f"{value:.4f}"
    return f"{value:.3f}"


def decoding_table(models: list[dict]) -> Table:
    """One row per unified student and decoding mode (greedy): the mode's held-out text loss
    (ar: next-token; diffusion: the masked-diffusion estimator on the same text), task
    accuracy (answers decoded in that mode) and speed."""
    table = Table(title="wft eval (decoding modes, greedy)", title_justify="left")
    table.add_column("model", overflow="fold", min_width=MODEL_MIN_WIDTH)
    for title in ("mode", "loss", "acc %", "tok/s", "tok/fwd"):
        table.add_column(title, justify="left" if title == "mode" else "right", no_wrap=True)
    for row in models:
        loss = {"ar": row.get("text_loss"), "diffusion": row.get("text_dlm_loss")}
        for mode, numbers in row.get("decoding", {}).items():
            accuracy = numbers.get("task_accuracy")
            table.add_row(row["model"], mode,
                          "= ar" if mode == "speculative" else eval_cell(mode, loss),
                          "-" if accuracy is None else f"{100 * accuracy:.1f}",
                          f"{numbers['tokens_per_second']:,.1f}",
                          f"{numbers['tokens_per_forward']:.2f}")
    return table


def decoding_notes(models: list[dict]) -> list[str]:
    """Under the decoding table: what was decoded, and whether greedy self-speculative
    decoding gave exactly the autoregressive output."""
    notes = [f"{row['model']}: no diffusion decoding: {row['decoding_problem']}"
             for row in models if row.get("decoding_problem")]
    for row in models:
        modes = row.get("decoding")
        if not modes:
            continue
        speculative, ar = modes["speculative"], modes["ar"]
        same = ("the same tokens as ar" if speculative["equals_ar"]
                else "[red]other tokens than ar[/] (a bug: please report it)")
        examples = f"; task acc: {ar['task_examples']} examples decoded" \
            if "task_examples" in ar else ""
        notes.append(f"{row['model']}: speculative gave {same}, "
                     f"{100 * speculative['acceptance']:.0f} % of drafts accepted{examples}")
    return notes
