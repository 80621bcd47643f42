"""`wft pipeline`: the recipe's stages in order, each reusing the previous output, then a
table of teacher vs student after every stage (and the BitNet-SFT baseline)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from wftool.commands.convert import run_convert
from wftool.model.checkpoint import load_model_dir
from wftool.recipe.schema import Recipe, ResumeSpec
from wftool.stage_registry import STUDENT_STAGE_NAMES, final_dir, get_stage
from wftool.train.evaluation import eval_batches, evaluate_model
from wftool.train.stages import refuse_random_teacher, run_pretrain


@dataclass
class PipelineRow:
    label: str
    path: Path


def _with_trained_teacher(recipe: Recipe, console: Console) -> tuple[Recipe, list[PipelineRow]]:
    """Train the full-precision teacher (pre-training, then task fine-tuning) and point the
    recipe's `model` (what the student starts from) and `teacher` (for distill) at it."""
    plan = recipe.teacher.train
    root = Path(recipe.output_dir) / recipe.name
    task_data = recipe.distill.data or recipe.data
    console.rule("teacher: full-precision pre-training")
    base = run_pretrain(recipe, console, output_dir=root / "teacher-base",
                        stage_label="teacher-base", training=plan.pretrain, data=recipe.data,
                        quantize=False, training_key="teacher.train.pretrain",
                        resume=ResumeSpec(), resume_key=None)
    console.rule("teacher: task fine-tuning (FP16-SFT)")
    sft = run_pretrain(recipe, console, output_dir=root / "teacher-sft",
                       stage_label="teacher-sft", init=base.final_dir, training=plan.finetune,
                       data=task_data, quantize=False, training_key="teacher.train.finetune",
                       resume=ResumeSpec(), resume_key=None)
    model = recipe.model.model_copy(
        update={"name_or_path": str(base.final_dir), "config": None, "tokenizer": None}
    )
    teacher = recipe.teacher.model_copy(update={"name_or_path": str(sft.final_dir)})
    updated = recipe.model_copy(update={"model": model, "teacher": teacher})
    rows = [PipelineRow("teacher (FP, pre-trained)", base.final_dir),
            PipelineRow("teacher (FP16-SFT)", sft.final_dir)]
    return updated, rows


def _baseline(recipe: Recipe, console: Console) -> PipelineRow:
    """BitNet-SFT: convert without SubLN, then task fine-tuning with CE only, same budget."""
    root = Path(recipe.output_dir) / recipe.name / "baseline"
    console.rule("baseline: BitNet-SFT")
    plain = recipe.model_copy(update={
        "convert": recipe.convert.model_copy(update={"sub_norm": "none",
                                                     "output": str(root / "convert")}),
    })
    if not (root / "convert" / "config.json").exists():
        run_convert(plain, force=True)
    result = run_pretrain(plain, console, output_dir=root / "sft", stage_label="baseline",
                          init=root / "convert", training=recipe.distill.training,
                          data=recipe.distill.data or recipe.data, quantize=True,
                          training_key="distill.training", resume=ResumeSpec(),
                          resume_key=None)
    return PipelineRow("BitNet-SFT baseline", result.final_dir)


def run_pipeline(recipe: Recipe, console: Console) -> list[dict]:
    rows: list[PipelineRow] = []
    teacher = recipe.teacher
    if "distill" in recipe.stages and not (teacher.name_or_path or teacher.train):
        refuse_random_teacher(recipe)  # before hours of earlier stages, not after
    if recipe.teacher.train is not None:
        recipe, rows = _with_trained_teacher(recipe, console)
    for stage in recipe.stages:
        console.rule(f"student: {stage}")
        info = get_stage(stage) if stage in STUDENT_STAGE_NAMES else None
        if stage == "convert":
            done = final_dir(recipe, "convert")
            if not (done / "config.json").exists():
                run_convert(recipe, force=True)
            else:
                console.print(f"convert: reusing {done}")
            rows.append(PipelineRow(info.table_label, done))
        elif info is not None and info.trains:
            result = info.run_function()(recipe, console)
            rows.append(PipelineRow(info.table_label, result.final_dir))
        else:
            console.print(f"[yellow]{stage}: not part of `wft pipeline` yet, skipped[/]")
    if recipe.pipeline.baseline and "distill" in recipe.stages:
        rows.append(_baseline(recipe, console))
    table = _evaluate_rows(recipe, rows)
    out = Path(recipe.output_dir) / recipe.name / "pipeline.json"
    out.write_text(json.dumps(table, indent=2))
    print_pipeline_table(table, recipe, console)
    console.print(f"results saved to {out}")
    return table


def _evaluate_rows(recipe: Recipe, rows: list[PipelineRow]) -> list[dict]:
    """Every model on the same held-out text and task batches."""
    text_data = recipe.data
    task_data = recipe.distill.data if "distill" in recipe.stages else None
    results, batches = [], {}
    for row in rows:
        model, tokenizer, _ = load_model_dir(row.path)
        if not batches:
            batches["text"] = eval_batches(text_data, tokenizer, 16)
            if task_data is not None and task_data.format == "task":
                batches["task"] = eval_batches(task_data, tokenizer, 32)
        entry = {"model": row.label, "path": str(row.path)}
        text = evaluate_model(model, batches["text"], task=False)
        entry.update({"text_loss": text.get("eval_loss"), "text_ppl": text.get("eval_ppl")})
        if "task" in batches:
            task = evaluate_model(model, batches["task"], task=True)
            entry.update({"task_loss": task.get("eval_loss"),
                          "task_accuracy": task.get("eval_accuracy")})
        results.append(entry)
    return results


def print_pipeline_table(rows: list[dict], recipe: Recipe, console: Console) -> None:
    table = Table(title=f"wft pipeline: {recipe.name} (held-out data)", title_justify="left")
    columns = [("model", None), ("text loss", "text_loss"), ("text ppl", "text_ppl"),
               ("task loss", "task_loss"), ("task acc %", "task_accuracy")]
    for title, _ in columns:
        table.add_column(title, justify="left" if title == "model" else "right")
    for row in rows:
        cells = [row["model"]]
        for title, key in columns[1:]:
            value = row.get(key)
            if value is None:
                cells.append("-")
            elif key == "task_accuracy":
                cells.append(f"{100 * value:.1f}")
            else:
                cells.append(f"{value:.3f}" if "loss" in key else f"{value:.2f}")
        table.add_row(*cells)
    console.print(table)
