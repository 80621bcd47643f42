"""`wft pipeline`: the recipe's stages in order, each reusing the previous output, then a
table of teacher vs student after every stage (and the BitNet-SFT baseline): held-out
numbers beside the majority-class floor, and each stage's wall time and training tokens."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from wftool.commands.convert import run_convert
from wftool.commands.plot import write_pipeline_plot
from wftool.eval.diffusion import diffusion_scores
from wftool.model.checkpoint import load_model_dir
from wftool.model.mask_token import diffusion_settings
from wftool.model.loading import load_source_model
from wftool.recipe.schema import DataSpec, ModelSpec, Recipe, ResumeSpec, TrainingSpec
from wftool.stage_registry import STUDENT_STAGE_NAMES, final_dir, get_stage
from wftool.train.evaluation import (
    accuracy_cell,
    accuracy_notes,
    accuracy_basis,
    MODEL_MIN_WIDTH,
    eval_batches,
    evaluate_model,
    majority_floor,
)
from wftool.train.metrics import read_metrics
from wftool.train.progress import format_duration
from wftool.train.stages import refuse_random_teacher, run_pretrain


@dataclass
class PipelineRow:
    """A model of the table and the stage that made it: wall time of this invocation
    (`reused`: an existing output was taken as is, so that time is not the stage's) and
    the tokens it trained on."""

    label: str
    path: Path | str
    seconds: float | None  # None: nothing was trained (the source model)
    tokens: int | None
    reused: bool = False
    source: ModelSpec | None = None  # a source model, loaded as `convert` loads it


def _trained_row(label: str, final: Path, start: float) -> PipelineRow:
    """The row of a training stage that just ended; its tokens are the last count its
    `metrics.jsonl` (beside `final/`) holds."""
    return PipelineRow(label, final, time.perf_counter() - start, _trained_tokens(final))


def _trained_tokens(final: Path) -> int | None:
    log = Path(final).parent / "metrics.jsonl"
    if not log.is_file():
        return None
    counts = [r["tokens"] for r in read_metrics(log) if r.get("tokens") is not None]
    return int(counts[-1]) if counts else None


def _with_trained_teacher(recipe: Recipe, console: Console) -> tuple[Recipe, list[PipelineRow]]:
    """Train the full-precision teacher (pre-training, then task fine-tuning) and point the
    recipe's `model` (what the student starts from) and `teacher` (for distill) at it."""
    plan = recipe.teacher.train
    root = Path(recipe.output_dir) / recipe.name
    task_data = recipe.distill.data or recipe.data
    console.rule("teacher: full-precision pre-training")
    start = time.perf_counter()
    base = run_pretrain(recipe, console, output_dir=root / "teacher-base",
                        stage_label="teacher-base", training=plan.pretrain, data=recipe.data,
                        quantize=False, training_key="teacher.train.pretrain",
                        resume=ResumeSpec(), resume_key=None)
    base_row = _trained_row("teacher (FP, pre-trained)", base.final_dir, start)
    console.rule("teacher: task fine-tuning (FP16-SFT)")
    start = time.perf_counter()
    sft = run_pretrain(recipe, console, output_dir=root / "teacher-sft",
                       stage_label="teacher-sft", init=base.final_dir, training=plan.finetune,
                       data=task_data, quantize=False, training_key="teacher.train.finetune",
                       resume=ResumeSpec(), resume_key=None)
    model = recipe.model.model_copy(
        update={"name_or_path": str(base.final_dir), "config": None, "tokenizer": None}
    )
    teacher = recipe.teacher.model_copy(update={"name_or_path": str(sft.final_dir)})
    updated = recipe.model_copy(update={"model": model, "teacher": teacher})
    sft_row = _trained_row("teacher (FP16-SFT)", sft.final_dir, start)
    return updated, [base_row, sft_row]


def _baseline(recipe: Recipe, console: Console) -> PipelineRow:
    """BitNet-SFT: convert without SubLN, then task fine-tuning with CE only, same budget."""
    console.rule("baseline: BitNet-SFT")
    start = time.perf_counter()
    plain, root = _converted_without_sub_norms(recipe)
    result = run_pretrain(plain, console, output_dir=root / "sft", stage_label="baseline",
                          init=root / "convert", training=recipe.distill.training,
                          data=recipe.distill.data or recipe.data, quantize=True,
                          training_key="distill.training", resume=ResumeSpec(),
                          resume_key=None)
    return _trained_row("BitNet-SFT baseline", result.final_dir, start)  # convert included


def _text_baseline(recipe: Recipe, console: Console) -> PipelineRow:
    """BitNet-SFT for a recipe without a task: convert without SubLN, then continued
    pre-training (CE) with the pretrain settings on as many tokens as layerwise and pretrain
    get together, from the same data: what BitDistill's first two stages are compared with."""
    console.rule("baseline: BitNet-SFT (no SubLN, no layerwise, same tokens)")
    start = time.perf_counter()
    training = same_token_budget(recipe)
    plain, root = _converted_without_sub_norms(
        recipe, pretrain=recipe.pretrain.model_copy(update={"training": training}))
    result = run_pretrain(plain, console, output_dir=root / "sft", stage_label="baseline",
                          init=root / "convert", training=training, quantize=True,
                          training_key="pretrain.training", resume=ResumeSpec(),
                          resume_key=None)
    return _trained_row("BitNet-SFT (no SubLN, no layerwise)", result.final_dir, start)


def _converted_without_sub_norms(recipe: Recipe, **sections) -> tuple[Recipe, Path]:
    """The baseline's recipe (convert.sub_norm none, plus `sections`) and its folder, with
    the model converted there once (a rerun reuses it)."""
    root = Path(recipe.output_dir) / recipe.name / "baseline"
    plain = recipe.model_copy(update={
        "convert": recipe.convert.model_copy(update={"sub_norm": "none",
                                                     "output": str(root / "convert")}),
        **sections,
    })
    if not (root / "convert" / "config.json").exists():
        run_convert(plain, force=True)
    return plain, root


def same_token_budget(recipe: Recipe) -> TrainingSpec:
    """The pretrain settings with max_steps raised to the tokens layerwise and pretrain
    train on together (rounded up to whole steps)."""
    def per_step(training: TrainingSpec, data: DataSpec | None) -> int:
        return training.micro_batch_size * training.grad_accum * (data or recipe.data).seq_len

    budget = sum(per_step(getattr(recipe, s).training, getattr(recipe, s).data)
                 * getattr(recipe, s).training.max_steps
                 for s in ("layerwise", "pretrain") if s in recipe.stages)
    pretrain = recipe.pretrain.training
    steps = -(-budget // per_step(pretrain, recipe.pretrain.data))
    return pretrain.model_copy(update={"max_steps": max(steps, 1)})


def run_pipeline(recipe: Recipe, console: Console) -> list[dict]:
    rows: list[PipelineRow] = []
    teacher = recipe.teacher
    if "distill" in recipe.stages and not (teacher.name_or_path or teacher.train):
        refuse_random_teacher(recipe)  # before hours of earlier stages, not after
    if recipe.teacher.train is not None:
        recipe, rows = _with_trained_teacher(recipe, console)
    elif recipe.model.name_or_path:  # the pretrained model the student starts from
        # It is the teacher unless the recipe names another one.
        label = "original model (FP)" if teacher.name_or_path else "teacher (FP, original)"
        rows.append(PipelineRow(label, recipe.model.name_or_path, None, None,
                                source=recipe.model))
    previous: tuple[str, Path] | None = None  # the stage just run and its output
    for stage in recipe.stages:
        console.rule(f"student: {stage}")
        info = get_stage(stage) if stage in STUDENT_STAGE_NAMES else None
        start = time.perf_counter()
        if stage == "convert":
            done = final_dir(recipe, "convert")
            reused = (done / "config.json").exists()
            if not reused:
                run_convert(recipe, force=True)
            else:
                console.print(f"convert: reusing {done}")
            rows.append(PipelineRow(info.table_label, done, time.perf_counter() - start, 0,
                                    reused))
            previous = (stage, done)
        elif info is not None and info.trains:
            # Each stage starts from the one before it in `stages` (not from an older run of
            # another stage it could also follow), unless the recipe names its init.
            chained = (previous is not None and previous[0] in info.previous
                       and not getattr(recipe, stage).init)
            result = info.run_function()(recipe, console,
                                         init=previous[1] if chained else None)
            rows.append(_trained_row(info.table_label, result.final_dir, start))
            previous = (stage, result.final_dir)
        else:
            console.print(f"[yellow]{stage}: not part of `wft pipeline` yet, skipped[/]")
    if recipe.pipeline.baseline and "distill" in recipe.stages:
        rows.append(_baseline(recipe, console))
    elif recipe.pipeline.baseline and "pretrain" in recipe.stages:
        rows.append(_text_baseline(recipe, console))
    table = _evaluate_rows(recipe, rows)
    out = Path(recipe.output_dir) / recipe.name / "pipeline.json"
    out.write_text(json.dumps(table, indent=2))
    print_pipeline_table(table, recipe, console)
    console.print(f"results saved to {out}")
    curves = write_pipeline_plot(out.parent)
    if curves is not None:
        console.print(f"loss curves: {curves}")
    return table


def _evaluate_rows(recipe: Recipe, rows: list[PipelineRow]) -> list[dict]:
    """Every model on the same held-out text and task batches."""
    text_data = recipe.data
    task_data = recipe.distill.data if "distill" in recipe.stages else None
    results, batches = [], {}
    for row in rows:
        if row.source is not None:
            model, tokenizer, _ = load_source_model(row.source)
        else:
            model, tokenizer, _ = load_model_dir(row.path)
        if not batches:
            batches["text"] = eval_batches(text_data, tokenizer, 16)
            if task_data is not None and task_data.format == "task":
                batches["task"] = eval_batches(task_data, tokenizer, 32)
            floor = majority_floor(batches.get("task", []))  # the same batches for every model
        entry = {"model": row.label, "path": str(row.path)}
        text = evaluate_model(model, batches["text"], task=False)
        entry.update({"text_loss": text.get("eval_loss"), "text_ppl": text.get("eval_ppl")})
        settings = diffusion_settings(model)
        if settings is not None:  # a unified student: its diffusion mode on the same text
            scores = diffusion_scores(model, batches["text"], settings)
            entry.update({f"text_{key}": value for key, value in scores.items()})
        if "task" in batches:
            task = evaluate_model(model, batches["task"], task=True)
            entry.update({"task_loss": task.get("eval_loss"),
                          "task_accuracy": task.get("eval_accuracy"),
                          "examples": floor.get("examples", 0),
                          "majority_accuracy": floor.get("majority_accuracy")})
        own = _stage_objective(row.path)
        if own is not None:
            entry["hidden_loss"] = own
        seconds = None if row.seconds is None else round(row.seconds, 2)
        entry.update({"seconds": seconds, "tokens": row.tokens,
                      "reused": row.reused})
        results.append(entry)
    return results


def _stage_objective(path) -> float | None:
    """A layer-wise stage's own held-out objective (hidden-state loss) from its final eval."""
    if not isinstance(path, Path):
        return None
    values = json.loads((path / "eval.json").read_text()) if (path / "eval.json").is_file() \
        else {}
    return values.get("eval_hidden")


def print_pipeline_table(rows: list[dict], recipe: Recipe, console: Console) -> None:
    """Rows are models; the notes under the table flag accuracies at the majority floor and
    ties (`wftool.train.evaluation.accuracy_notes`, as `wft eval` does)."""
    table = Table(title=f"wft pipeline: {recipe.name} (held-out data)", title_justify="left")
    table.add_column("model", overflow="fold", min_width=MODEL_MIN_WIDTH)
    for title in pipeline_titles(rows):
        table.add_column(title, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(row["model"], *pipeline_cells(row, rows))
    console.print(table)
    basis = accuracy_basis(rows)
    if basis:
        console.print(basis, highlight=False)
    for row in rows:
        if row.get("hidden_loss") is not None:
            console.print(f"{row['model']}: trained on hidden states, not next-token prediction "
                          f"(held-out hidden-state loss {row['hidden_loss']:.4g})",
                          highlight=False)
    for note in accuracy_notes(rows):
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    if any(row.get("reused") for row in rows):
        console.print("time: this run's; a reused output (marked *) was made earlier",
                      highlight=False)


NUMBER_COLUMNS = [("text\nloss", "text_loss"), ("text\nppl", "text_ppl"),
                  ("diffusion\nloss", "text_dlm_loss"), ("masked\nacc %", "text_dlm_accuracy"),
                  ("task\nloss", "task_loss"), ("task\nacc %", "task_accuracy"),
                  ("tokens", "tokens"), ("time", "seconds")]


def _columns(rows: list[dict]) -> list[tuple[str, str]]:
    """The number columns with a value in some row (a text-only recipe has no task columns)."""
    return [(title, key) for title, key in NUMBER_COLUMNS
            if key in ("tokens", "seconds") or any(row.get(key) is not None for row in rows)]


def pipeline_titles(rows: list[dict]) -> list[str]:
    """The number columns' titles (two lines each, so the table fits 80 columns)."""
    shared = accuracy_basis(rows) is not None
    return [title if key != "task_accuracy" or shared else "task acc %\n(n, floor)"
            for title, key in _columns(rows)]


def pipeline_cells(row: dict, rows: list[dict]) -> list[str]:
    """A pipeline.json row's cells under `pipeline_titles(rows)`, as the table prints them
    (the README's generated table uses the same)."""
    shared = accuracy_basis(rows) is not None
    return [accuracy_cell(row, shared) if key == "task_accuracy" else _cell(key, row)
            for _, key in _columns(rows)]


def _cell(key: str, row: dict) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "tokens":
        return _count(value)
    if key == "seconds":
        return format_duration(value) + (" *" if row.get("reused") else "")
    if key == "text_dlm_accuracy":
        return f"{100 * value:.1f}"
    if "loss" in key:
        return f"{value:.3f}"
    return f"{value:.2f}" if value < 1e5 else f"{value:.2e}"  # a broken model's ppl: 6.02e+07


def _count(tokens: int) -> str:
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if tokens >= size:
            return f"{tokens / size:.1f}{unit}"
    return str(tokens)
