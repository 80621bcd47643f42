"""Training checkpoints: `<stage dir>/step-N/`, written atomically, resumed automatically.

Model and optimizer state go through torch.distributed.checkpoint (its state-dict helpers
handle plain, DDP and FSDP2 models alike, and every rank writes its own shard); the rest
(step, schedules, hook state, data position, RNG) is JSON, so loading a checkpoint never
unpickles anything. A step directory is assembled under a temporary name, gets its
`COMPLETE` marker last (with a SHA-256 of every file, checked before a resume) and is then
renamed, so a crash leaves either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
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

from wftool.atomic import disk_full_error, is_disk_full, write_text_atomic
from wftool.train.distributed import barrier, world

# Single-process runs are a supported case of DCP, not something to warn about.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)

COMPLETE = "COMPLETE"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"


class CorruptCheckpoint(Exception):
    pass


def _rank() -> int:
    return world()[0]


def rng_state() -> dict:
    """Every RNG a run draws from, as JSON-ready lists."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "cuda": ([s.tolist() for s in torch.cuda.get_rng_state_all()]
                 if torch.cuda.is_available() else None),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def step_number(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _share(names: list[str]) -> list[str]:
    """This rank's part of a sorted list of files: the processes hash a checkpoint
    together, each a 1/world share, rather than rank 0 reading all of it."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return sorted(names)[_rank()::world]


def _shared_digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root` but the marker, by relative path, hashed by all
    ranks together; the whole dict on rank 0 ({} elsewhere). Every rank must call it."""
    names = [p.relative_to(root).as_posix() for p in root.rglob("*")
             if p.is_file() and p.name != COMPLETE]
    mine = {name: _sha256(root / name) for name in _share(names)}
    if not dist.is_initialized():
        return mine
    parts = [None] * dist.get_world_size() if _rank() == 0 else None
    dist.gather_object(mine, parts, dst=0)
    return {k: v for part in parts for k, v in part.items()} if _rank() == 0 else {}


def verify(path: Path) -> None:
    """Check this rank's share of a step directory's files against the digests in its
    marker (markers written before digests existed hold only the step number and are
    taken as they are)."""
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError) as err:
        raise CorruptCheckpoint(f"{path}: unreadable {COMPLETE} marker ({err})") from None
    if not isinstance(marker, dict):
        return
    expected = marker.get("files", {})
    for name in _share(list(expected)):
        if not (path / name).is_file():
            raise CorruptCheckpoint(f"{path}: {name} is missing")
        if _sha256(path / name) != expected[name]:
            raise CorruptCheckpoint(f"{path}: {name} is damaged (checksum mismatch)")


def _verify_once(path: Path) -> None:
    """`verify` by every rank on its share, the verdicts shared: every rank then skips the
    same checkpoint or enters the same collective load (one rank loading alone would wait
    forever)."""
    problem = None
    try:
        verify(path)
    except CorruptCheckpoint as err:
        problem = str(err)
    if dist.is_initialized():
        verdicts = [None] * dist.get_world_size()
        dist.all_gather_object(verdicts, problem)
        problem = next((v for v in verdicts if v is not None), None)
    if problem is not None:
        raise CorruptCheckpoint(problem)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _read_legacy(path: Path) -> dict:
    """A `.pt` state file from before JSON state: tensors and numpy arrays only, never
    arbitrary code (weights_only with numpy's array types allowed)."""
    try:
        from numpy._core import multiarray  # numpy 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    rebuild = multiarray._reconstruct
    # Files pickled under either numpy major version name the function by its own path.
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), rebuild,
               (rebuild, "numpy.core.multiarray._reconstruct"),
               (rebuild, "numpy._core.multiarray._reconstruct")]
    with torch.serialization.safe_globals(allowed):
        state = torch.load(path, weights_only=True)
    rng = state.get("rng")
    if rng is not None:  # back to the JSON layout set_rng_state reads
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        rng["torch"] = rng["torch"].tolist()
        rng["numpy"] = [kind, np.asarray(keys).tolist(), pos, has_gauss, cached]
        rng["python"] = list(rng["python"])
        if rng.get("cuda") is not None:
            rng["cuda"] = [s.tolist() for s in rng["cuda"]]
    return state


def _read_state(path: Path, stem: str) -> dict:
    if (path / f"{stem}.json").exists():
        return _read_json(path / f"{stem}.json")
    return _read_legacy(path / f"{stem}.pt")


class CheckpointManager:
    def __init__(self, stage_dir: Path, keep_last: int = 2):
        self.stage_dir = Path(stage_dir)
        self.keep_last = keep_last
        if _rank() == 0:
            self._remove_leftovers()

    def complete_steps(self) -> list[Path]:
        """Finished step directories, newest first."""
        if not self.stage_dir.is_dir():
            return []
        steps = [
            p for p in self.stage_dir.glob("step-*")
            if p.is_dir() and p.name.split("-", 1)[1].isdigit() and (p / COMPLETE).exists()
        ]
        return sorted(steps, key=step_number, reverse=True)

    def _remove_leftovers(self) -> None:
        """What a killed run left: checkpoints being assembled, and step directories whose
        pruning had begun (their marker goes first)."""
        if not self.stage_dir.is_dir():
            return
        for path in self.stage_dir.glob(".step-*.partial"):
            final = self.stage_dir / path.name[1:].removesuffix(".partial")
            if (path / COMPLETE).exists() and not final.exists():
                os.replace(path, final)  # killed between replacing a step and the rename
            else:
                shutil.rmtree(path, ignore_errors=True)
        for path in self.stage_dir.glob("step-*"):
            if path.is_dir() and not (path / COMPLETE).exists():
                shutil.rmtree(path, ignore_errors=True)
        for path in self.stage_dir.glob(f".{LATEST}.tmp-*"):
            path.unlink(missing_ok=True)

    def save(self, step: int, model, optimizers, schedulers, trainer_state: dict,
             data_state: dict, extra_files: dict[str, str]) -> Path:
        final = self.stage_dir / f"step-{step}"
        partial = self.stage_dir / f".step-{step}.partial"
        rank = _rank()
        try:
            if rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            barrier()
            model_state, optim_state = get_state_dict(model, optimizers)
            dcp.save({"model": model_state, "optim": optim_state},
                     checkpoint_id=partial / "state")
            rank_state = {"data": data_state, "rng": rng_state()}
            (partial / f"rank{rank}.json").write_text(json.dumps(rank_state))
            if rank == 0:
                state = dict(trainer_state, step=step,
                             schedulers=[s.state_dict() for s in schedulers])
                (partial / TRAINER_STATE).write_text(json.dumps(state, indent=1))
                for name, text in extra_files.items():
                    (partial / name).write_text(text)
            barrier()
            digests = _shared_digests(partial)
            if rank == 0:
                marker = {"step": step, "files": digests}
                (partial / COMPLETE).write_text(json.dumps(marker, indent=1))
                if final.exists():
                    shutil.rmtree(final)
                os.replace(partial, final)
                write_text_atomic(self.stage_dir / LATEST, final.name + "\n")
                self._prune()
        except Exception as err:
            if rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            if is_disk_full(err):
                earlier = self.complete_steps()
                kept = (f"the earlier checkpoint {earlier[0].name} is intact" if earlier
                        else "no earlier checkpoint exists")
                raise disk_full_error(f"checkpoint step-{step}", self.stage_dir, kept) from None
            raise
        barrier()
        return final

    def _prune(self) -> None:
        for old in self.complete_steps()[self.keep_last :]:
            # The marker goes first: a kill mid-delete leaves no "complete" half checkpoint.
            (old / COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model, optimizers, schedulers, *, load_optimizer: bool = True,
             load_scheduler: bool = True, world_size: int = 1) -> tuple[dict, list[dict]]:
        """Restore state from `path`; returns (trainer_state, the data state every rank
        saved). DCP re-shards model and optimizer state for any process count; the RNG state
        of this rank is restored when the process count is the one that saved it."""
        try:
            _verify_once(path)
            trainer_state = _read_state(path, "trainer_state")
            saved_world = trainer_state.get("world_size", 1)
            rank_states = [_read_state(path, f"rank{r}") for r in range(saved_world)]
            # Asking for optimizer state initialises it, so only do that when loading it.
            state = {"model": get_model_state_dict(model)}
            if load_optimizer:
                state["optim"] = get_optimizer_state_dict(model, optimizers)
            dcp.load(state, checkpoint_id=path / "state")
        except CorruptCheckpoint:
            raise
        except (Exception, CheckpointException) as err:  # any bad piece spoils the step
            lines = str(err).strip().splitlines()
            raise CorruptCheckpoint(
                f"{path}: {type(err).__name__}: {lines[0] if lines else ''}") from err
        set_model_state_dict(model, state["model"])
        if load_optimizer:
            set_optimizer_state_dict(model, optimizers, state["optim"])
        if load_scheduler:
            for scheduler, saved in zip(schedulers, trainer_state["schedulers"]):
                scheduler.load_state_dict(saved)
        if saved_world == world_size:
            set_rng_state(rank_states[_rank()]["rng"])
        return trainer_state, [rank["data"] for rank in rank_states]
