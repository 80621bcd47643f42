"""One training loop for every stage; the stage supplies its objective.

Reads top to bottom like a torchtune recipe: `setup` (device, optimizers, data, resume),
`train` (accumulate, clip, step, log, evaluate, checkpoint), `save_final`. Nothing assumes a
single process: data are sharded by rank, state goes through torch.distributed.checkpoint,
and every rank takes part in every save.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import yaml

from wftool.data.packing import build_stream
from wftool.errors import WftError
from wftool.model.checkpoint import TernaryMetadata, save_model_dir
from wftool.model.surgery import set_quant_mix
from wftool.recipe.schema import DataSpec, Recipe, ResumeSpec, TrainingSpec
from wftool.train.checkpointing import CheckpointManager, CorruptCheckpoint
from wftool.train.metrics import MetricsLog, ProgressDisplay, WandbSink, peak_memory_gb
from wftool.train.evaluation import eval_batches, evaluate_model
from wftool.train.optim import build_optimizers, build_schedulers
from wftool.train.remote import stage_url, upload_dir

# objective(model, batch, progress in [0, 1]) -> (loss, {part name: value})
Objective = Callable[[torch.nn.Module, dict, float], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class StageRun:
    """Everything one stage's training needs, resolved from the recipe."""

    recipe: Recipe
    stage: str
    output_dir: Path
    model: torch.nn.Module
    tokenizer: object
    objective: Objective
    training: TrainingSpec
    data: DataSpec
    resume: ResumeSpec = field(default_factory=ResumeSpec)
    meta: TernaryMetadata | None = None  # None: a full-precision model
    warmup_steps: int = 0  # quantization warm-up
    extra_modules: list[torch.nn.Module] = field(default_factory=list)  # e.g. the teacher


@dataclass
class TrainResult:
    final_dir: Path
    steps: int
    eval: dict


def _device() -> torch.device:
    if torch.cuda.is_available():
        rank = dist.get_rank() if dist.is_initialized() else 0
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _dist_info() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _versions() -> dict:
    import importlib.metadata as md

    return {d: md.version(d) for d in ("wftool", "torch", "transformers")}


class Trainer:
    def __init__(self, run: StageRun, console=None):
        self.run = run
        self.console = console
        self.spec = run.training
        self.rank, self.world_size = _dist_info()

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        run, spec = self.run, self.spec
        self.device = _device()
        torch.manual_seed(spec.seed + self.rank)
        self.model = run.model.to(self.device)
        for module in run.extra_modules:
            module.to(self.device)
        self.model.train()
        if spec.activation_checkpointing and hasattr(self.model, "gradient_checkpointing_enable"):
            self.model.gradient_checkpointing_enable()
        self.forward_model = torch.compile(self.model) if spec.compile else self.model
        self.autocast = self._autocast_context()
        self.optimizers = build_optimizers(self.model, spec)
        self.schedulers = build_schedulers(self.optimizers, spec)
        self.train_stream = build_stream(run.data, run.tokenizer, "train", self.rank,
                                         self.world_size)
        self.eval_batches = eval_batches(run.data, run.tokenizer, spec.micro_batch_size)
        self.checkpoints = CheckpointManager(run.output_dir, spec.keep_last)
        self.step = 0
        self.tokens_seen = 0
        self.last_eval: dict = {}
        resumed = self._resume() if run.resume.mode == "auto" else None
        self.metrics = MetricsLog(run.output_dir / "metrics.jsonl", resume_step=resumed)
        self.sinks = [self.metrics]
        logging = run.recipe.logging
        if logging.wandb and self.rank == 0:
            name = logging.run_name or f"{run.recipe.name}-{run.stage}-{time.strftime('%m%d-%H%M')}"
            self.sinks.append(WandbSink(logging.project, name,
                                        run.recipe.model_dump(mode="json"), None))

    def _autocast_context(self):
        precision = self.spec.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        if precision == "bf16":
            return lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext

    def _resume(self) -> int | None:
        """Load the newest usable checkpoint; a corrupt one is reported and skipped."""
        candidates = self.checkpoints.complete_steps()
        for path in candidates:
            try:
                state, data_state = self.checkpoints.load(
                    path, self.model, self.optimizers, self.schedulers,
                    load_optimizer=self.run.resume.load_optimizer,
                    load_scheduler=self.run.resume.load_scheduler,
                )
            except CorruptCheckpoint as err:
                self._say(f"[yellow]skipping unusable checkpoint[/] {err}")
                continue
            self.step = state["step"]
            self.tokens_seen = state.get("tokens_seen", 0)
            self.train_stream.load_state_dict(data_state)
            self._say(f"resumed {self.run.stage} from {path} (step {self.step})")
            return self.step
        if candidates:
            # A failed load may have half-written the weights: never train on from those.
            raise WftError(
                f"no usable checkpoint in {self.run.output_dir} (all {len(candidates)} are "
                "corrupt)",
                f"move that directory away, or set {self.run.stage}.resume.mode=never",
            )
        return None

    # ---- training ------------------------------------------------------------------------
    def train(self) -> TrainResult:
        spec = self.spec
        display = ProgressDisplay(f"{self.run.recipe.name}/{self.run.stage}", spec.max_steps,
                                  self.step, spec.log_every, self.console)
        try:
            while self.step < spec.max_steps:
                record = self.train_step()
                self.step += 1
                record["step"] = self.step
                if self.step % spec.eval_every == 0 or self.step == spec.max_steps:
                    record.update(self.evaluate())
                for sink in self.sinks:
                    sink.write(record)
                display.update(self.step, {
                    k: record[k] for k in record
                    if k in ("loss", "lr", "tok/s", "eval_loss", "eval_accuracy", "mem_gb")
                    or k.startswith("loss_")
                })
                if self.step % spec.save_every == 0 or self.step == spec.max_steps:
                    self.save_checkpoint()
        finally:
            display.close()
            for sink in self.sinks:
                sink.close()
        if not self.last_eval:
            self.last_eval = self.evaluate()
        return TrainResult(self.save_final(), self.step, self.last_eval)

    def train_step(self) -> dict:
        """One optimizer step (gradient accumulation included); returns its metrics."""
        spec, run = self.spec, self.run
        progress = self.step / max(spec.max_steps - 1, 1)
        if run.warmup_steps and run.meta is not None:
            set_quant_mix(self.model, min(1.0, (self.step + 1) / run.warmup_steps))
        start = time.perf_counter()
        parts_total: dict[str, float] = {}
        loss_total = 0.0
        tokens = 0
        for _ in range(spec.grad_accum):
            batch = self._to_device(self.train_stream.next_batch(spec.micro_batch_size))
            mask = batch.get("attention_mask")
            tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            with self.autocast():
                loss, parts = run.objective(self.forward_model, batch, progress)
            if not torch.isfinite(loss):
                raise WftError(
                    f"{run.stage}: loss is {loss.item()} at step {self.step + 1}",
                    "lower training.lr, or enable training.grad_clip",
                )
            (loss / spec.grad_accum).backward()
            loss_total += loss.item() / spec.grad_accum
            for key, value in parts.items():
                parts_total[key] = parts_total.get(key, 0.0) + value / spec.grad_accum
        grad_norm = None
        if spec.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), spec.grad_clip)
        lr = self.schedulers[0].get_last_lr()[0]
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        self.tokens_seen += tokens * self.world_size
        record = {"loss": loss_total, **{f"loss_{k}": v for k, v in parts_total.items()},
                  "lr": lr, "tok/s": tokens * self.world_size / elapsed,
                  "tokens": self.tokens_seen, "mem_gb": peak_memory_gb(self.device)}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        return record

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def evaluate(self) -> dict:
        self.last_eval = evaluate_model(self.model, self.eval_batches,
                                        self.run.data.format == "task", self.device,
                                        self.autocast)
        return self.last_eval

    # ---- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        recipe_text = yaml.safe_dump(self.run.recipe.model_dump(mode="json", by_alias=True),
                                     sort_keys=False)
        return self.checkpoints.save(
            self.step, self.model, self.optimizers, self.schedulers,
            {"tokens_seen": self.tokens_seen, "stage": self.run.stage},
            self.train_stream.state_dict(),
            {"recipe.yaml": recipe_text, "versions.json": json.dumps(_versions(), indent=2)},
        )

    def save_final(self) -> Path:
        """The Hugging Face style `final/` directory the next stage and export read."""
        final = self.run.output_dir / "final"
        if self.rank == 0:
            meta = self.run.meta
            if meta is not None:
                meta.stage = self.run.stage
            self.model.eval()
            save_model_dir(self.model, self.run.tokenizer, final, meta)
            (final / "recipe.yaml").write_text(
                yaml.safe_dump(self.run.recipe.model_dump(mode="json", by_alias=True),
                               sort_keys=False))
            (final / "eval.json").write_text(json.dumps(self.last_eval, indent=2))
            if self.run.recipe.sync_to:
                upload_dir(final, stage_url(self.run.recipe.sync_to, self.run.recipe.name,
                                            self.run.stage))
        if dist.is_initialized():
            dist.barrier()
        return final

    def _say(self, text: str) -> None:
        if self.console is not None and self.rank == 0:
            self.console.print(text)
