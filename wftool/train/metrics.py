"""Where training metrics go: a JSONL file always, W&B when enabled, and the terminal."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from wftool.errors import WftError


class MetricsLog:
    """Append-only JSONL of {"step": N, ...}; on resume, lines past the checkpoint are dropped
    so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [
                line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class WandbSink:
    def __init__(self, project: str, run_name: str, config: dict, mode: str | None):
        try:
            import wandb
        except ImportError:
            raise WftError(
                "logging.wandb is enabled but wandb is not installed",
                "pip install 'wftool[wandb]', or set logging.wandb=false",
            ) from None
        self.run = wandb.init(project=project, name=run_name, config=config, mode=mode,
                              resume="allow")

    def write(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    except ImportError:  # pragma: no cover - non-Unix
        return 0.0


class ProgressDisplay:
    """A rich progress bar on a terminal; one plain line every `every` steps otherwise."""

    def __init__(self, title: str, total: int, start: int, every: int, console: Console | None):
        self.console = console or Console(stderr=True)
        self.every = every
        self.total = total
        self.live = self.console.is_terminal
        self._progress = None
        if self.live:
            self._progress = Progress(
                TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"), console=self.console,
            )
            self._task = self._progress.add_task(title, total=total, completed=start, stats="")
            self._progress.start()
        self.title = title
        self._t0 = time.monotonic()
        self._start = start

    def update(self, step: int, stats: dict) -> None:
        text = "  ".join(_format_stat(k, v) for k, v in stats.items())
        if self._progress is not None:
            self._progress.update(self._task, completed=step, stats=text)
        elif step % self.every == 0 or step == self.total:
            done = step - self._start
            elapsed = time.monotonic() - self._t0
            eta = elapsed / max(done, 1) * (self.total - step)
            self.console.print(
                f"{self.title} step {step}/{self.total}  {text}  eta {eta:.0f}s", highlight=False
            )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def _format_stat(key: str, value) -> str:
    if isinstance(value, float):
        if key in ("tok/s",):
            return f"{key} {value:,.0f}"
        return f"{key} {value:.4g}"
    return f"{key} {value}"
