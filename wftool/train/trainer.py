"""One training loop for every stage; the stage supplies its objective.

Reads top to bottom like a torchtune recipe: `setup` (device, precision, optimizers, data,
resume), `train` (accumulate, clip, step, log, evaluate, checkpoint), `save_final`.
Nothing assumes a single process: data are sharded by rank, state goes through
torch.distributed.checkpoint, every rank enters every collective (checkpoint barriers, the
metrics all-reduce), and only rank 0 writes progress, metrics and W&B.

Mixed precision as the reference trainers do it: the student's latent (master) weights and
the optimizer state are fp32 whatever the checkpoint's dtype; forward and backward run
under bf16 autocast on GPUs; a frozen teacher keeps the recipe's `teacher.dtype`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from wftool.train import distributed

from wftool.atomic import disk_full_error, is_disk_full
from wftool.errors import WftError
from wftool.model.checkpoint import TernaryMetadata, save_model_dir
from wftool.model.surgery import current_quant_mix
from wftool.quant.q_sparse import current_q_sparsity
from wftool.recipe.schema import DataSpec, Recipe, ResumeSpec, TrainingSpec
from wftool.train.checkpointing import CheckpointManager, CorruptCheckpoint
from wftool.train.data_shards import ShardedStream, check_layout, saved_positions
from wftool.train.evaluation import eval_batches, evaluate_model
from wftool.train.hooks import QSparseWarmup, QuantWarmup, StepHook
from wftool.train.metrics import MetricsLog, TensorBoardSink, WandbSink, peak_memory_gb
from wftool.train.progress import ProgressDisplay, format_duration
from wftool.train.objectives import Objective
from wftool.train.optim import build_optimizers, build_schedulers
from wftool.train.precision import Precision, resolve_precision
from wftool.train.remote import stage_url, upload_dir

_SHOWN = ("loss", "lr", "tok/s", "eval_loss", "eval_accuracy", "mem_gb", "quant_mix",
          "eval_hidden", "eval_dlm", "eval_dlm_accuracy", "dlm_weight", "qk_max_logit", "q_sparsity")


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
    warmup_steps: int = 0  # quantization warm-up (recipe.quantization.warmup_steps)
    extra_modules: list[torch.nn.Module] = field(default_factory=list)  # e.g. the teacher
    # Where the recipe holds this run's `training` and `resume` settings, for messages
    # (default `<stage>.training`, `<stage>.resume`; None: the run has no resume settings).
    training_key: str = ""
    resume_key: str | None = ""

    def __post_init__(self):
        self.training_key = self.training_key or f"{self.stage}.training"
        if self.resume_key == "":
            self.resume_key = f"{self.stage}.resume"

    def start_over_hint(self) -> str:
        if self.resume_key is None:
            return f"move {self.output_dir} away to start over"
        return f"set {self.resume_key}.mode=never to start over (the old run is moved aside)"


@dataclass
class TrainResult:
    final_dir: Path
    steps: int
    eval: dict


def _versions() -> dict:
    import importlib.metadata as md

    return {d: md.version(d) for d in ("wftool", "torch", "transformers")}


class Trainer:
    def __init__(self, run: StageRun, console=None):
        self.run = run
        self.console = console
        self.spec = run.training
        self.rank, self.world_size = distributed.world()

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        run, spec = self.run, self.spec
        distributed.init_from_environment()
        self.rank, self.world_size = distributed.world()
        self.device = distributed.process_device()
        self.precision: Precision = resolve_precision(spec.precision, self.device)
        torch.manual_seed(spec.seed + self.rank)
        settings = run.recipe.distributed
        self.strategy = settings.strategy if self.world_size > 1 else None
        # fp32 masters: AdamW on bf16 weights loses most small updates. FSDP2 moves each
        # layer to the GPU as it shards it, so the whole fp32 model never sits on one GPU.
        self.model = run.model.to(dtype=torch.float32)
        if self.strategy != "fsdp2":
            self.model.to(self.device)
        for module in run.extra_modules:
            distributed.place_teacher(module, settings.teacher, self.device)
        self.model.train()
        if spec.activation_checkpointing and hasattr(self.model, "gradient_checkpointing_enable"):
            # Non-reentrant: the variant FSDP2 and DDP support.
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        unused = getattr(run.objective, "leaves_parameters_unused", False)
        wrapped = (distributed.shard_student(self.model, self.strategy, self.device, unused)
                   if self.strategy else self.model)
        self.forward_model = torch.compile(wrapped) if spec.compile else wrapped
        self.hooks: list[StepHook] = list(getattr(run.objective, "hooks", ()))
        if run.meta is not None:
            self.hooks.insert(0, QuantWarmup(self.model, run.warmup_steps))
            quantization = run.recipe.quantization
            if quantization.q_sparsity or run.meta.q_sparsity:
                self.hooks.insert(1, QSparseWarmup(self.model, quantization.q_sparsity,
                                                   quantization.q_sparse_warmup_steps))
        self.optimizers = build_optimizers(self.model, spec,
                                           sharded=self.strategy == "fsdp2")
        self.schedulers = build_schedulers(self.optimizers, spec)
        # Built once the shard count is known (it may come from a checkpoint), as is the
        # batch split a global_batch_size asks for.
        self.train_stream: ShardedStream | None = None
        distributed.require_shared_directory(run.output_dir)
        self.checkpoints = CheckpointManager(run.output_dir, spec.keep_last)
        distributed.barrier()  # rank 0 has cleaned up after a killed run before anyone looks
        self.step = 0
        self.tokens_seen = 0
        self.last_eval: dict = {}
        if run.resume.mode == "never":
            self._set_aside_previous_run()
        resumed = self._resume() if run.resume.mode == "auto" else None
        if self.train_stream is None:
            self._open_data(settings.data_shards or self.world_size)
        self.eval_batches = eval_batches(run.data, run.tokenizer, self.spec.micro_batch_size)
        self.complete = self._check_progress()
        self.sinks = []
        if self.rank == 0 and not self.complete:
            self.sinks.append(MetricsLog(run.output_dir / "metrics.jsonl", resume_step=resumed))
            logging = run.recipe.logging
            if logging.wandb:
                name = logging.run_name or f"{run.recipe.name}-{run.stage}"
                self.sinks.append(WandbSink(logging.project, name,
                                            run.recipe.model_dump(mode="json"), run.output_dir))
            if logging.tensorboard:
                self.sinks.append(TensorBoardSink(run.output_dir / "tensorboard", resumed))
        self._say(self._header())
        warmup = next((h for h in self.hooks if isinstance(h, QuantWarmup)), None)
        fresh_convert = run.meta is not None and run.meta.stage == "convert"
        if warmup and warmup.steps and self.step == 0 and warmup.start >= 1.0 and fresh_convert:
            self._say(f"[yellow]quantization.warmup_steps={warmup.steps}, but the converted "
                      "input is already fully ternary (converted without a warm-up): no "
                      "warm-up; run `wft convert --force` again to start the ramp at 0[/]")

    def _header(self) -> str:
        params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        teacher = {str(p.dtype).removeprefix("torch.") for m in self.run.extra_modules
                   for p in m.parameters()}
        processes = (f" x {self.world_size} processes ({self.strategy}, data in "
                     f"{self.train_stream.shards} shards)" if self.world_size > 1 else "")
        return (f"{self.run.stage}: {params:,} trainable parameters on {self.device}"
                f"{processes} · {self.precision.describe()}"
                + (f" · teacher {', '.join(sorted(teacher))}" if teacher else ""))

    def _planned_batch(self, spec: TrainingSpec, shards_per_process: int) -> TrainingSpec:
        from wftool.train.gpu_profiles import plan_for_run

        micro, accum, basis = plan_for_run(spec, self.run, self.device, self.world_size,
                                           shards_per_process)
        processes = "1 process" if self.world_size == 1 else f"{self.world_size} processes"
        self._say(f"global batch {spec.global_batch_size} rows = {processes} x micro-batch "
                  f"{micro} x grad_accum {accum} ({basis})")
        return spec.model_copy(update={"micro_batch_size": micro, "grad_accum": accum})

    def _open_data(self, shards: int, saved_rows: int | None = None,
                   resumed: bool = False) -> None:
        spec = self.run.training
        if spec.global_batch_size and shards % self.world_size == 0:
            spec = self._planned_batch(spec, shards // self.world_size)
        self.spec = spec
        check_layout(shards, self.world_size, spec.grad_accum, self.run.training_key,
                     spec.micro_batch_size, saved_rows, from_checkpoint=resumed)
        self.train_stream = ShardedStream(self.run.data, self.run.tokenizer, shards,
                                          self.rank, self.world_size)

    def _global_rows(self) -> int:
        """Rows per optimizer step over all processes."""
        return self.spec.micro_batch_size * self.spec.grad_accum * self.world_size

    def _set_aside_previous_run(self) -> None:
        """`resume.mode=never`: move an earlier run out of the way (kept, not deleted), so
        neither this run nor the next plain one mixes with it."""
        out = self.run.output_dir
        if self.rank == 0 and out.is_dir() and any(out.iterdir()):
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = out.with_name(f"{out.name}.replaced-{stamp}")
            for n in range(2, 1000):  # two restarts within one second
                if not aside.exists():
                    break
                aside = out.with_name(f"{out.name}.replaced-{stamp}-{n}")
            os.replace(out, aside)
            self._say(f"resume.mode=never: moved the previous {self.run.stage} run to {aside}")
        distributed.barrier()

    def _resume(self) -> int | None:
        """Load the newest usable checkpoint; a corrupt one is reported and skipped."""
        candidates = self.checkpoints.complete_steps()
        for path in candidates:
            try:
                state, data_states = self.checkpoints.load(
                    path, self.model, self.optimizers, self.schedulers,
                    load_optimizer=self.run.resume.load_optimizer,
                    load_scheduler=self.run.resume.load_scheduler,
                    world_size=self.world_size,
                )
                shards, positions = saved_positions(data_states)
            except (CorruptCheckpoint, ValueError) as err:
                self._say(f"[yellow]skipping unusable checkpoint[/] {err}")
                continue
            self.step = state["step"]
            self.tokens_seen = state.get("tokens_seen", 0)
            self._check_shard_setting(shards)
            self._open_data(shards, state.get("global_rows"), resumed=True)
            self.train_stream.load_state_dict(positions)
            saved_rows = state.get("global_rows")
            if saved_rows and saved_rows != self._global_rows():
                self._say(f"[yellow]the global batch changes from {saved_rows} rows per step "
                          f"(before step {self.step}) to {self._global_rows()}[/]")
            hook_states = state.get("hooks")
            for hook in self.hooks:
                if hook_states is None and isinstance(hook, QuantWarmup):
                    hook.resume_per_stage_ramp(self.step)  # a checkpoint from before hooks
                elif hook.name in (hook_states or {}):
                    hook.load_state_dict(hook_states[hook.name])
            self._say(f"resumed {self.run.stage} from {path} (step {self.step})")
            return self.step
        if candidates:
            # A failed load may have half-written the weights: never train on from those.
            raise WftError(
                f"no usable checkpoint in {self.run.output_dir} (all {len(candidates)} are "
                "corrupt)",
                self.run.start_over_hint(),
            )
        return None

    def _check_shard_setting(self, shards: int) -> None:
        wanted = self.run.recipe.distributed.data_shards
        if wanted is not None and wanted != shards:
            raise WftError(
                f"distributed.data_shards={wanted}, but the run in {self.run.output_dir} "
                f"splits its data into {shards} shards (fixed by its first checkpoint)",
                f"remove the setting to resume, or {self.run.start_over_hint()}")

    def _check_progress(self) -> bool:
        """True when this run already finished; an error when it went past `max_steps`."""
        run, steps = self.run, self.spec.max_steps
        if self.step > steps:
            raise WftError(
                f"{run.stage}: the run in {run.output_dir} is already at step {self.step}, "
                f"past training.max_steps={steps}",
                f"raise {run.training_key}.max_steps above {self.step} to train on from step "
                f"{self.step}, or {run.start_over_hint()}",
            )
        final = run.output_dir / "final"
        if self.step == steps and (final / "config.json").exists():
            eval_file = final / "eval.json"
            self.last_eval = json.loads(eval_file.read_text()) if eval_file.exists() else {}
            return True
        return False

    # ---- training ------------------------------------------------------------------------
    def train(self) -> TrainResult:
        run, spec = self.run, self.spec
        final = run.output_dir / "final"
        if self.complete:
            self._say(
                f"{run.stage} is already complete ({self.step}/{spec.max_steps} steps): "
                f"{final}. To train longer, raise {run.training_key}.max_steps (it resumes "
                f"from step {self.step}); or {run.start_over_hint()}.")
            return TrainResult(final, self.step, self.last_eval)
        display = _NoDisplay() if self.rank else ProgressDisplay(
            f"{run.recipe.name}/{run.stage}", spec.max_steps, self.step, spec.log_every,
            self.console, tokens_seen=self.tokens_seen)
        pending: list[dict] = []
        window_start = time.perf_counter()
        estimated = False
        try:
            while self.step < spec.max_steps:
                record = self._train_step_or_explain_oom()
                if not estimated:
                    self._say_estimate(time.perf_counter() - window_start)
                    estimated = True
                self.step += 1
                record["step"] = self.step
                pending.append(record)
                last = self.step == spec.max_steps
                evaluating = self.step % spec.eval_every == 0 or last
                saving = self.step % spec.save_every == 0 or last
                if not (self.step % spec.log_every == 0 or evaluating or saving):
                    continue
                window_tokens = self._resolve(pending)  # the one host sync of the window
                elapsed = time.perf_counter() - window_start
                for entry in pending:
                    entry["tok/s"] = window_tokens / max(elapsed, 1e-9)
                display.update(self.step, _shown(record))  # tok/s: this window's, as logged
                if evaluating:  # the bar reads N/N while the last step evaluates and saves
                    display.set_phase("evaluating")
                    record.update(self.evaluate())
                    display.set_phase(None)
                    display.update(self.step, _shown(record))
                self._write_metrics(pending)
                pending = []
                if saving:
                    display.set_phase(f"saving step-{self.step}")
                    self.save_checkpoint()
                    display.set_phase(None)
                window_start = time.perf_counter()
            if not self.last_eval:
                self.last_eval = self.evaluate()
            display.set_phase("writing final/")
            final = self.save_final()
            display.finish({**_labelled(self.last_eval), "tokens": self.tokens_seen})
        finally:
            display.close()
            for sink in self.sinks:
                sink.close()
        return TrainResult(final, self.step, self.last_eval)

    def _train_step_or_explain_oom(self) -> dict:
        try:
            return self.train_step()
        except torch.OutOfMemoryError:
            from wftool.train.gpu_profiles import oom_error

            spec = self.spec
            raise oom_error(self.step, spec.micro_batch_size, spec.grad_accum,
                            self.run.training_key, spec.activation_checkpointing,
                            bool(self.run.extra_modules), peak_memory_gb(self.device),
                            planned=bool(spec.global_batch_size)) from None

    def train_step(self) -> dict:
        """One optimizer step (gradient accumulation included). Losses stay on the device
        as detached tensors; `_resolve` brings a window of steps to the host at once."""
        spec, run = self.spec, self.run
        progress = self.step / max(spec.max_steps - 1, 1)
        for hook in self.hooks:
            hook.before_step(self.step)
        loss_total = torch.zeros((), device=self.device)
        parts_total: dict[str, torch.Tensor] = {}
        tokens = 0
        for micro in range(spec.grad_accum):
            batch = self.train_stream.next_batch(spec.micro_batch_size)
            mask = batch.get("attention_mask")  # counted on the host, before the copy
            tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            batch = self._to_device(batch)
            with self._gradient_sync(micro == spec.grad_accum - 1):
                with self.precision.autocast(self.device):
                    loss, parts = run.objective(self.forward_model, batch, progress)
                (loss / spec.grad_accum).backward()
            loss_total += loss.detach().float() / spec.grad_accum
            for key, value in parts.items():
                parts_total[key] = parts_total.get(key, 0.0) + value.float() / spec.grad_accum
        record: dict = {"loss": loss_total, **{f"loss_{k}": v for k, v in parts_total.items()}}
        if spec.grad_clip:
            record["grad_norm"] = distributed.to_full(torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), spec.grad_clip))
        record["lr"] = self.schedulers[0].get_last_lr()[0]
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        for hook in self.hooks:
            hook.after_step(self.step)
            record.update(hook.metrics())
        # Summed over the processes in `_resolve` (padded task batches differ by rank).
        record["_tokens"] = torch.tensor(float(tokens), device=self.device)
        return record

    def _gradient_sync(self, last_micro_batch: bool):
        """DDP all-reduces gradients once per step, at the last micro-batch (FSDP2
        reduce-scatters every micro-batch, which keeps gradients sharded in between)."""
        if self.strategy == "ddp" and not last_micro_batch:
            return self.forward_model.no_sync()
        return contextlib.nullcontext()

    def _say_estimate(self, first_step: float) -> None:
        """Before the run is under way: its length from the first step's time."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # once: the first step's real duration
        remaining = self.spec.max_steps - self.step - 1  # after this first one
        if remaining > 0:
            self._say(f"{self.run.stage}: first step {first_step:.2f} s; the other "
                      f"{remaining} take about {format_duration(first_step * remaining)} plus "
                      "evaluation and checkpoints (the first step includes warm-up, so this "
                      "errs long)")

    def _resolve(self, records: list[dict]) -> int:
        """Tensors in `records` -> floats with one device-to-host copy (averaged over ranks,
        token counts summed); a non-finite loss stops the run before anything is saved.
        Returns the window's tokens, all processes together."""
        slots = [(r, k) for r in records for k, v in r.items() if torch.is_tensor(v)]
        if slots:
            values = torch.stack([r[k].detach().float().reshape(()) for r, k in slots])
            distributed.all_reduce_mean(values)
            for (record, key), value in zip(slots, values.tolist()):
                record[key] = value
        for record in records:
            if not math.isfinite(record["loss"]):
                raise WftError(
                    f"{self.run.stage}: loss is {record['loss']} at step {record['step']}",
                    f"lower {self.run.training_key}.lr, or set {self.run.training_key}.grad_clip",
                )
        records[-1]["mem_gb"] = peak_memory_gb(self.device)
        window = 0
        for record in records:
            tokens = round(record.pop("_tokens") * self.world_size)
            window += tokens
            self.tokens_seen += tokens
            record["tokens"] = self.tokens_seen
        return window

    def _write_metrics(self, records: list[dict]) -> None:
        try:
            for entry in records:
                for sink in self.sinks:
                    sink.write(entry)
        except OSError as err:
            if not is_disk_full(err):
                raise
            saved = self.checkpoints.complete_steps()
            kept = (f"checkpoints up to {saved[0].name} are intact" if saved
                    else "no checkpoint was written yet")
            raise disk_full_error("metrics.jsonl", self.run.output_dir, kept) from None

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def evaluate(self) -> dict:
        self.last_eval = evaluate_model(self.model, self.eval_batches,
                                        self.run.data.format == "task", self.device,
                                        lambda: self.precision.autocast(self.device),
                                        getattr(self.run.objective, "held_out", None))
        return self.last_eval

    # ---- checkpoints ---------------------------------------------------------------------
    def _recipe_text(self) -> str:
        return yaml.safe_dump(self.run.recipe.model_dump(mode="json", by_alias=True),
                              sort_keys=False)

    def save_checkpoint(self) -> Path:
        state = {"tokens_seen": self.tokens_seen, "stage": self.run.stage,
                 "hooks": {hook.name: hook.state_dict() for hook in self.hooks},
                 "world_size": self.world_size, "global_rows": self._global_rows()}
        return self.checkpoints.save(
            self.step, self.model, self.optimizers, self.schedulers, state,
            self.train_stream.state_dict(),
            {"recipe.yaml": self._recipe_text(),
             "versions.json": json.dumps(_versions(), indent=2)},
        )

    def save_final(self) -> Path:
        """The Hugging Face style `final/` directory the next stage and export read: fp32
        latent weights (config.json says so) and the warm-up mix reached."""
        final = self.run.output_dir / "final"
        # FSDP2: every rank takes part in gathering the shards; rank 0 writes them.
        weights = distributed.full_state_dict(self.model) if self.strategy == "fsdp2" else None
        if self.rank == 0:
            meta = self.run.meta
            if meta is not None:
                meta.stage = self.run.stage
                meta.quant_mix = current_quant_mix(self.model)
                meta.q_sparsity = current_q_sparsity(self.model)
            self.model.eval()
            save_model_dir(self.model, self.run.tokenizer, final, meta, extra_files={
                "recipe.yaml": self._recipe_text(),
                "eval.json": json.dumps(self.last_eval, indent=2)}, state_dict=weights)
        distributed.barrier()
        if self.rank == 0 and self.run.recipe.sync_to:  # after the barrier: no rank waits on it
            upload_dir(final, stage_url(self.run.recipe.sync_to, self.run.recipe.name,
                                        self.run.stage))
        return final

    def _say(self, text: str) -> None:
        if self.console is not None and self.rank == 0:
            self.console.print(text, soft_wrap=True)  # piped logs keep one line per message



def _shown(record: dict) -> dict:
    return _labelled({k: v for k, v in record.items() if k in _SHOWN or k.startswith("loss_")})


def _labelled(stats: dict) -> dict:
    """Where a stage reports its own held-out objective (layerwise: `eval_hidden`), the
    next-token numbers are shown as such: that stage does not train for them."""
    if "eval_hidden" not in stats:
        return stats
    names = {"eval_loss": "next-token eval_loss", "eval_ppl": "next-token eval_ppl"}
    return {names.get(k, k): v for k, v in stats.items()}


class _NoDisplay:
    """Ranks other than 0 show nothing."""

    def update(self, *args, **kwargs) -> None: ...

    def set_phase(self, text) -> None: ...

    def finish(self, summary) -> None: ...

    def close(self) -> None: ...
