"""Where training metrics go: a JSONL file always, W&B and TensorBoard when enabled (the
terminal's progress line is `wftool.train.progress`)."""

from __future__ import annotations

import json
import secrets
import string
from pathlib import Path

import torch

from wftool.errors import WftError


class MetricsLog:
    """Append-only JSONL of {"step": N, ...}; on resume, lines past the checkpoint are dropped
    so the file reads as one uninterrupted run. Lines that do not parse (a kill mid-write
    leaves a torn last line) are dropped too."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = []
            for line in self.path.read_text(errors="replace").splitlines():
                record = _parse_record(line)
                if record is not None and record.get("step", 0) <= resume_step:
                    kept.append(line)
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _parse_record(line: str) -> dict | None:
    """One JSONL record, or None for a blank, torn or foreign line."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("step", 0), (int, float)):
        return None
    return record


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class WandbSink:
    """Logs records to W&B. Every start in the same stage directory continues one W&B run:
    the run id is kept in `run_dir/wandb_run_id`, and wandb writes under `run_dir/wandb/`."""

    def __init__(self, project: str, run_name: str, config: dict, run_dir: Path,
                 mode: str | None = None):
        try:
            import wandb
        except ImportError:
            raise WftError(
                "logging.wandb is enabled but wandb is not installed",
                "pip install 'wftool[wandb]', or set logging.wandb=false",
            ) from None
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if not run_id:
            # What wandb.util.generate_id() made; newer wandb releases dropped it.
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits)
                             for _ in range(8))
            id_file.write_text(run_id + "\n")
        self.run_id = run_id
        self.run = wandb.init(project=project, name=run_name, config=config, id=run_id,
                              resume="allow", dir=str(run_dir), mode=mode)

    def write(self, record: dict) -> None:
        self.run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink:
    """Logs numeric records as TensorBoard scalars under `log_dir` (the stage's `tensorboard/`).
    A resumed run writes a purge marker at its first step, so TensorBoard drops what the
    interrupted run logged past the checkpoint and the curve reads as one run."""

    def __init__(self, log_dir: Path, resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise WftError(
                "logging.tensorboard is enabled but tensorboard is not installed",
                "pip install 'wftool[tensorboard]', or set logging.tensorboard=false",
            ) from None
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def write(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    except ImportError:  # pragma: no cover - non-Unix
        return 0.0
