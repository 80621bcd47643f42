"""`wft plot`: a run's loss curves, every stage on one step axis (stages follow each other).

Always drawn in the terminal (braille dots, one colour per stage); also written as a PNG
with matplotlib when asked (`pip install 'wftool[plot]'`). The pipeline calls
`write_pipeline_plot` to leave `<run>/curves.png` behind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from wftool.commands.runs import read_records, stage_dirs
from wftool.errors import WftError

_COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_white", "orange3")
_PNG_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
                "tab:pink", "tab:gray")


@dataclass
class Curve:
    """One stage's losses against the global step (its own step + the stages before it)."""
    stage: str
    offset: int
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_losses: list[float] = field(default_factory=list)


@dataclass
class PlotResult:
    curves: int  # stages drawn
    png: Path | None  # the PNG written, if one was asked for


def stage_curves(run_dir: Path) -> list[Curve]:
    """A curve for every stage folder with metrics, in life order, offset end to end."""
    curves, offset = [], 0
    for label, path in stage_dirs(Path(run_dir)):
        records = read_records(path / "metrics.jsonl")
        if not records:
            continue
        curve = Curve(label, offset)
        for record in records:
            step = offset + int(record["step"])
            if _finite(record.get("loss")):
                curve.steps.append(step)
                curve.losses.append(float(record["loss"]))
            if _finite(record.get("eval_loss")):
                curve.eval_steps.append(step)
                curve.eval_losses.append(float(record["eval_loss"]))
        if curve.steps or curve.eval_steps:
            curves.append(curve)
        offset += max(int(r["step"]) for r in records)
    return curves


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot_run(run_dir: Path, output: Path | None, console: Console) -> PlotResult:
    """Print the run's loss curves in the terminal; with `output`, also write them as PNG."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise WftError(f"run folder {run_dir} does not exist",
                       "`wft runs` lists the runs under runs/ (or --output-dir)")
    curves = stage_curves(run_dir)
    if not curves:
        raise WftError(f"no training metrics under {run_dir} (no stage has a metrics.jsonl)",
                       "train a stage first, e.g. `wft pipeline RECIPE`")
    console.print(terminal_plot(curves, console.width, title=run_dir.name))
    if output is None:
        return PlotResult(len(curves), None)
    _require_matplotlib()
    drawn = write_png(curves, Path(output), run_dir.name)
    console.print(f"wrote {escape(str(output))}")
    return PlotResult(drawn, Path(output))


def write_pipeline_plot(run_dir: Path) -> Path | None:
    """`<run_dir>/curves.png` when matplotlib is installed and a stage has metrics; else None."""
    run_dir = Path(run_dir)
    curves = stage_curves(run_dir)
    if not curves or not _has_matplotlib():
        return None
    write_png(curves, run_dir / "curves.png", run_dir.name)
    return run_dir / "curves.png"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _require_matplotlib() -> None:
    if not _has_matplotlib():
        raise WftError("writing a PNG needs matplotlib, which is not installed",
                       "pip install 'wftool[plot]' (the terminal plot needs nothing: drop "
                       "--output)")


def write_png(curves: list[Curve], output: Path, title: str) -> int:
    """Draw the curves with matplotlib (Agg, no pyplot state) and return the lines drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for index, curve in enumerate(curves):
        colour = _PNG_COLOURS[index % len(_PNG_COLOURS)]
        ax.plot(curve.steps, curve.losses, color=colour, linewidth=1.2, label=curve.stage)
        if curve.eval_steps:  # markers, not lines: one Line2D per stage
            ax.scatter(curve.eval_steps, curve.eval_losses, color=colour, marker="o", s=18,
                       zorder=3, edgecolors="black", linewidths=0.4)
    ax.set_xlabel("step (stages end to end)")
    ax.set_ylabel("loss (dots: eval_loss)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, format="png")
    return len(ax.lines)


# ---- terminal plot -----------------------------------------------------------------------
# A braille character is a 2x4 grid of dots; bit of the dot at (column, row) in the cell.
_BRAILLE_BITS = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))


def terminal_plot(curves: list[Curve], width: int, height: int = 10, title: str = "") -> Text:
    """Train loss as braille lines fitted to `width` columns, then a legend per stage."""
    points = [(s, v) for c in curves for s, v in zip(c.steps, c.losses)]
    if not points:
        return Text("no train loss to plot")
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    first, last = min(s for s, _ in points), max(s for s, _ in points)
    labels = (f"{hi:.4g}", f"{lo:.4g}")
    margin = max(len(label) for label in labels) + 1
    columns = max(10, min(width, 120) - margin - 1)
    dots_x, dots_y = columns * 2, height * 4
    cells: dict[tuple[int, int], tuple[int, int]] = {}  # (row, col) -> (bits, curve index)

    def to_dot(step: int, value: float) -> tuple[int, int]:
        x = round((step - first) / max(last - first, 1) * (dots_x - 1))
        y = round((hi - value) / (hi - lo) * (dots_y - 1)) if hi > lo else dots_y // 2
        return x, y

    for index, curve in enumerate(curves):
        dots = [to_dot(s, v) for s, v in zip(curve.steps, curve.losses)]
        for (x0, y0), (x1, y1) in zip(dots, dots[1:] or dots):
            n = max(abs(x1 - x0), abs(y1 - y0), 1)
            for i in range(n + 1):  # every dot on the segment: a line, not scattered points
                x, y = round(x0 + (x1 - x0) * i / n), round(y0 + (y1 - y0) * i / n)
                key = (y // 4, x // 2)
                bits = cells.get(key, (0, index))[0] | _BRAILLE_BITS[x % 2][y % 4]
                cells[key] = (bits, index)

    text = Text()
    if title:
        text.append(f"{title}: train loss by step\n", style="bold")
    for row in range(height):
        label = labels[0] if row == 0 else labels[1] if row == height - 1 else ""
        text.append(label.rjust(margin - 1) + " ┤" if label else " " * margin + "│",
                    style="dim")
        for col in range(columns):
            bits, index = cells.get((row, col), (0, 0))
            text.append(chr(0x2800 + bits) if bits else " ",
                        style=_COLOURS[index % len(_COLOURS)] if bits else None)
        text.append("\n")
    axis = f"{first}".ljust(columns // 2) + f"{last}".rjust(columns - columns // 2)
    text.append(" " * margin + "└" + "─" * columns + "\n" + " " * (margin + 1) + axis + "\n",
                style="dim")
    for index, curve in enumerate(curves):
        text.append("  ━━ ", style=_COLOURS[index % len(_COLOURS)])
        text.append(curve.stage, style=_COLOURS[index % len(_COLOURS)] + " bold")
        if curve.steps:
            text.append(f"  steps {curve.steps[0]}-{curve.steps[-1]}  loss "
                        f"{curve.losses[0]:.4g} → {curve.losses[-1]:.4g}")
        if curve.eval_losses:
            text.append(f"  eval_loss {curve.eval_losses[-1]:.4g}")
        text.append("\n")
    text.rstrip()
    return text


def resolve_run_dir(run: str) -> Path:
    """A run folder, a run name under runs/, or a recipe (its `<output_dir>/<name>`)."""
    path = Path(run).expanduser()
    if path.is_dir():
        return path
    if (Path("runs") / run).is_dir() and "/" not in run:
        return Path("runs") / run
    from wftool.recipe.load import load_recipe

    try:
        recipe = load_recipe(run)
    except WftError:
        raise WftError(f"{run}: no such run folder, and not a recipe",
                       "pass a run folder (`wft runs` lists them) or a recipe") from None
    run_dir = Path(recipe.output_dir) / recipe.name
    if not run_dir.is_dir():
        raise WftError(f"recipe {run} has no run yet ({run_dir} does not exist)",
                       f"train it first: wft pipeline {run}")
    return run_dir


def plot_command(
    run: Annotated[str, typer.Argument(
        help="Run folder (runs/<name>), or a recipe file or bundled recipe name.")],
    output: Annotated[Optional[Path], typer.Option(
        help="Also write the curves as a PNG here (needs matplotlib).")] = None,
) -> None:
    """Plot a run's loss curves: train loss per stage, stages end to end, in the terminal;
    --output also writes a PNG (needs `pip install 'wftool\\[plot]'`).

    RUN is a run folder, or a recipe (its run folder is `<output_dir>/<name>`).
    """
    plot_run(resolve_run_dir(run), output, Console())
