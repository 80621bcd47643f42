"""Training checkpoints: `<stage dir>/step-N/`, written atomically, resumed automatically.

Model and optimizer state go through torch.distributed.checkpoint (its state-dict helpers
handle plain, DDP and FSDP2 models alike, and every rank writes its own shard). A step
directory is assembled under a temporary name, gets its `COMPLETE` marker last and is then
renamed, so a crash leaves either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

# Single-process runs are a supported case of DCP, not something to warn about.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)

COMPLETE = "COMPLETE"
LATEST = "latest"


class CorruptCheckpoint(Exception):
    pass


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_number(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


class CheckpointManager:
    def __init__(self, stage_dir: Path, keep_last: int = 2):
        self.stage_dir = Path(stage_dir)
        self.keep_last = keep_last

    def complete_steps(self) -> list[Path]:
        """Finished step directories, newest first."""
        if not self.stage_dir.is_dir():
            return []
        steps = [
            p for p in self.stage_dir.glob("step-*")
            if p.is_dir() and p.name.split("-", 1)[1].isdigit() and (p / COMPLETE).exists()
        ]
        return sorted(steps, key=step_number, reverse=True)

    def save(self, step: int, model, optimizers, schedulers, trainer_state: dict,
             data_state: dict, extra_files: dict[str, str]) -> Path:
        final = self.stage_dir / f"step-{step}"
        partial = self.stage_dir / f".step-{step}.partial"
        if _rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        _barrier()
        model_state, optim_state = get_state_dict(model, optimizers)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=partial / "state")
        rank = _rank()
        torch.save({"data": data_state, "rng": rng_state()}, partial / f"rank{rank}.pt")
        _barrier()
        if rank == 0:
            state = dict(trainer_state, step=step,
                         schedulers=[s.state_dict() for s in schedulers])
            torch.save(state, partial / "trainer_state.pt")
            for name, text in extra_files.items():
                (partial / name).write_text(text)
            (partial / COMPLETE).write_text(f"{step}\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            _write_text_atomic(self.stage_dir / LATEST, final.name + "\n")
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        for old in self.complete_steps()[self.keep_last :]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model, optimizers, schedulers, *, load_optimizer: bool = True,
             load_scheduler: bool = True) -> tuple[dict, dict]:
        """Restore state from `path`; returns (trainer_state, data_state of this rank)."""
        try:
            trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
            rank_state = torch.load(path / f"rank{_rank()}.pt", weights_only=False)
            # Asking for optimizer state initialises it, so only do that when loading it.
            state = {"model": get_model_state_dict(model)}
            if load_optimizer:
                state["optim"] = get_optimizer_state_dict(model, optimizers)
            dcp.load(state, checkpoint_id=path / "state")
        except (Exception, CheckpointException) as err:  # any bad piece spoils the step
            raise CorruptCheckpoint(f"{path}: {type(err).__name__}: {err}") from err
        set_model_state_dict(model, state["model"])
        if load_optimizer:
            set_optimizer_state_dict(model, optimizers, state["optim"])
        if load_scheduler:
            for scheduler, saved in zip(schedulers, trainer_state["schedulers"]):
                scheduler.load_state_dict(saved)
        set_rng_state(rank_state["rng"])
        return trainer_state, rank_state["data"]
