"""`wft runs`: what is under output_dir, read from the files alone (no torch import).

A run is a folder `<output_dir>/<name>/` holding at least one stage folder. For each stage
this reads `metrics.jsonl`, the `step-N/` checkpoints and `final/` to say how far it got,
and the `recipe.yaml` a checkpoint or `final/` carries to say how far it was meant to go.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wftool.errors import WftError
from wftool.stage_registry import STUDENT_STAGE_NAMES

# Stage folder (relative to the run folder) -> its label, in the order a run lives them.
STAGE_FOLDERS: tuple[tuple[str, str], ...] = (
    ("teacher-base", "teacher-base"),
    ("teacher-sft", "teacher-sft"),
    *((name, name) for name in STUDENT_STAGE_NAMES),
    ("baseline/sft", "baseline"),
)
# Where a stage's planned step count sits in the recipe it saved (student stages:
# `<stage>.training.max_steps`); the pipeline trains these with other sections' budgets.
_PLAN_KEYS = {
    "teacher-base": ("teacher", "train", "pretrain", "max_steps"),
    "teacher-sft": ("teacher", "train", "finetune", "max_steps"),
    "baseline": ("distill", "training", "max_steps"),
}


@dataclass
class StageSummary:
    name: str
    path: Path
    state: str  # finished | interrupted | converted | started
    done: int | None = None  # last step reached (None: not a training stage)
    planned: int | None = None  # max_steps from the recipe it was trained with
    eval: dict = field(default_factory=dict)  # last eval_loss / eval_accuracy / eval_ppl

    @property
    def trains(self) -> bool:
        return self.done is not None or self.planned is not None


@dataclass
class RunSummary:
    name: str
    path: Path
    stages: list[StageSummary]
    size_bytes: int
    ggufs: list[tuple[str, int]]  # (path relative to the run folder, bytes)
    modified: datetime | None

    @property
    def state(self) -> str:
        """The state of the stage it reached last."""
        return self.stages[-1].state if self.stages else "empty"


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; blank or torn lines (a kill mid-write) are skipped."""
    records = []
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def list_runs(output_dir: Path) -> list[RunSummary]:
    """Every run under `output_dir` (a subfolder with at least one stage folder), by name."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    runs = []
    for path in sorted(p for p in output_dir.iterdir() if p.is_dir()):
        summary = summarize_run(path)
        if summary.stages:
            runs.append(summary)
    return runs


def stage_dirs(run_dir: Path) -> list[tuple[str, Path]]:
    """(label, folder) of the stage folders a run has, in life order."""
    return [(label, run_dir / rel) for rel, label in STAGE_FOLDERS if (run_dir / rel).is_dir()]


def summarize_run(run_dir: Path) -> RunSummary:
    run_dir = Path(run_dir)
    stages = [_summarize_stage(label, path) for label, path in stage_dirs(run_dir)]
    size, newest, ggufs = 0, 0.0, []
    for root, _dirs, files in os.walk(run_dir):
        for name in files:
            path = Path(root) / name
            try:
                info = path.lstat()
            except OSError:  # removed while we walk (a checkpoint being pruned)
                continue
            size += info.st_size
            newest = max(newest, info.st_mtime)
            if name.endswith(".gguf"):
                ggufs.append((str(path.relative_to(run_dir)), info.st_size))
    modified = datetime.fromtimestamp(newest) if newest else None
    return RunSummary(run_dir.name, run_dir, stages, size, sorted(ggufs), modified)


def _summarize_stage(label: str, path: Path) -> StageSummary:
    final = path / "final"
    has_final = (final / "config.json").exists()
    records = read_records(path / "metrics.jsonl")
    checkpoints = _checkpoint_steps(path)
    if label == "convert":
        return StageSummary(label, path, "converted" if has_final else "started")
    if not (records or checkpoints):  # a model copied in, or a stage that has not begun
        planned = _planned_steps(final / "recipe.yaml", label)
        return StageSummary(label, path, "finished" if has_final else "started", None, planned,
                            _read_json(final / "eval.json") if has_final else {})
    done = max((int(r["step"]) for r in records), default=0)
    if checkpoints:
        done = max(done, checkpoints[0][0])
    # The newest saved recipe: a run resumed with a higher max_steps plans past its old final/.
    saved = [p for p in [final / "recipe.yaml"] + [c / "recipe.yaml" for _, c in checkpoints[:1]]
             if p.is_file()]
    recipe_file = max(saved, key=lambda p: p.stat().st_mtime, default=None)
    planned = _planned_steps(recipe_file, label)
    if has_final and (planned is None or done >= planned):
        state = "finished"
    else:
        state = "interrupted"
    evals = [r for r in records if "eval_loss" in r]
    last_eval = {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {}
    if not last_eval and has_final:
        last_eval = _read_json(final / "eval.json")
    return StageSummary(label, path, state, done, planned, last_eval)


def _checkpoint_steps(stage_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints, newest first. The COMPLETE marker holds
    JSON with "step" (older checkpoints: just the number)."""
    found = []
    for path in stage_dir.glob("step-*"):
        marker = path / "COMPLETE"
        if not marker.is_file():
            continue
        try:
            value = json.loads(marker.read_text() or "null")
        except ValueError:
            value = None
        step = value.get("step") if isinstance(value, dict) else value
        if not isinstance(step, int):
            suffix = path.name.removeprefix("step-")
            if not suffix.isdigit():
                continue
            step = int(suffix)
        found.append((step, path))
    return sorted(found, key=lambda item: item[0], reverse=True)


def _planned_steps(recipe_file: Path | None, label: str) -> int | None:
    if recipe_file is None or not recipe_file.is_file():
        return None
    try:
        value = yaml.safe_load(recipe_file.read_text())
    except (yaml.YAMLError, OSError):
        return None
    keys = _PLAN_KEYS.get(label, (label, "training", "max_steps"))
    if label == "baseline" and "distill" not in (value.get("stages") or ["distill"]):
        keys = ("pretrain", "training", "max_steps")  # a text recipe's baseline: pretrain's
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, int) else None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def human_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""  # unreachable


_STATE_STYLE = {"finished": "green", "converted": "green", "interrupted": "yellow",
                "started": "dim"}


def print_runs(runs: list[RunSummary], console: Console) -> None:
    """One table: a row per stage, run-wide columns (size, GGUF, modified) on its first row.
    The eval accuracy and GGUF columns appear only when some run has them."""
    stages = [stage for run in runs for stage in run.stages]
    with_acc = any("eval_accuracy" in stage.eval for stage in stages)
    with_gguf = any(run.ggufs for run in runs)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for column in ("run", "stage", "steps", "state"):
        table.add_column(column, no_wrap=True)
    table.add_column("eval loss", justify="right", min_width=6)
    if with_acc:
        table.add_column("eval acc", justify="right")
    table.add_column("size", justify="right", no_wrap=True)
    if with_gguf:
        table.add_column("GGUF", overflow="fold", min_width=12)
    table.add_column("modified", min_width=8)
    for index, run in enumerate(runs):
        if index:
            table.add_section()
        ggufs = "\n".join(f"{escape(name)} ({human_size(size)})" for name, size in run.ggufs)
        modified = run.modified.strftime("%b %d %H:%M") if run.modified else ""
        for row, stage in enumerate(run.stages):
            first = row == 0
            cells = [escape(run.name) if first else "", stage.name, _steps(stage),
                     _state(stage.state), _number(stage.eval.get("eval_loss"), "{:.3f}")]
            if with_acc:
                cells.append(_number(stage.eval.get("eval_accuracy"), "{:.1%}"))
            cells.append(human_size(run.size_bytes) if first else "")
            if with_gguf:
                cells.append(ggufs if first else "")
            cells.append(modified if first else "")
            table.add_row(*cells)
    console.print(table)


def _steps(stage: StageSummary) -> str:
    if not stage.trains:
        return ""
    done = "?" if stage.done is None else stage.done
    planned = "?" if stage.planned is None else stage.planned
    return f"{done}/{planned}"


def _state(state: str) -> str:
    style = _STATE_STYLE.get(state)
    return f"[{style}]{state}[/]" if style else state


def _number(value, form: str) -> str:
    return form.format(value) if isinstance(value, (int, float)) else ""


def runs_command(
    output_dir: Annotated[Path, typer.Option(
        help="The folder the runs live in (a recipe's output_dir).")] = Path("runs"),
) -> None:
    """List the runs under OUTPUT_DIR: each stage's steps done / planned, state, last eval,
    size on disk and GGUF exports."""
    console = Console()
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise WftError(f"{output_dir} is a file, not a runs folder",
                       "pass the folder a recipe's output_dir names: wft runs --output-dir DIR")
    if not output_dir.is_dir():
        console.print(f"No runs yet: {escape(str(output_dir))} does not exist. Start one with "
                      "`wft pipeline RECIPE`, or point at another folder with --output-dir.")
        return
    runs = list_runs(output_dir)
    if not runs:
        console.print(f"No runs in {escape(str(output_dir))} (no folder with stage "
                      "outputs). Start one with `wft pipeline RECIPE`.")
        return
    print_runs(runs, console)
