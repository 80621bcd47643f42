"""From the global batch a recipe asks for to micro-batch x accumulation on a given GPU.

`training.global_batch_size` fixes the rows per optimizer step; the process count and the
GPU's memory decide how they are split. The memory model is the usual estimate (Korthikanti
et al. 2022 for activations, 16 bytes per trained parameter for fp32 masters, gradients and
Adam state, divided by the process count under FSDP2); it errs on the safe side, and a
CUDA out-of-memory error still ends in `oom_error`, which names the override to try.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wftool.errors import WftError

# Usable memory per GPU, GB (the card's memory, less what the CUDA context takes).
GPU_MEMORY_GB = {
    "a10g": 22.0, "l4": 22.0, "a100-40gb": 38.0, "a100-80gb": 78.0, "h100": 78.0,
    "h200": 138.0, "b200": 176.0,
}
_HEADROOM = 0.85  # fragmentation, NCCL buffers, the allocator's cache


def detect_profile(device: torch.device) -> str | None:
    """The profile of this process's GPU from its name and memory; None on a CPU or an
    unknown card (whose memory is then read directly)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    memory = torch.cuda.get_device_properties(device).total_memory / 1e9
    if "GH200" in name or "GB200" in name or "L40" in name:
        return None  # other memory sizes than the cards their names contain
    for key, profile in (("B200", "b200"), ("H200", "h200"), ("H100", "h100"),
                         ("L4", "l4"), ("A10G", "a10g")):
        if key in name:
            return profile
    if "A100" in name:
        return "a100-80gb" if memory > 60 else "a100-40gb"
    return None


@dataclass(frozen=True)
class ModelSize:
    """What the memory estimate needs to know about the student (and a teacher)."""

    trained_params: int
    frozen_params: int  # the teacher's, in its own dtype
    frozen_bytes: int  # bytes per teacher parameter
    hidden: int
    layers: int
    heads: int
    vocab: int
    eager_attention: bool = False  # attention scores materialised (not SDPA / flash)

    @classmethod
    def of(cls, model, teachers=()) -> ModelSize:
        config = model.config
        frozen = [p for t in teachers for p in t.parameters()]
        return cls(
            trained_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
            frozen_params=sum(p.numel() for p in frozen),
            frozen_bytes=frozen[0].element_size() if frozen else 2,
            hidden=config.hidden_size, layers=config.num_hidden_layers,
            heads=config.num_attention_heads, vocab=config.vocab_size,
            eager_attention=getattr(config, "_attn_implementation", None) == "eager")


def row_gb(size: ModelSize, seq_len: int, checkpointing: bool, teacher: bool) -> float:
    """Activation memory of one row of `seq_len` tokens, GB, in bf16."""
    s, h, a, layers = seq_len, size.hidden, size.heads, size.layers
    full_layer = 34 * s * h + (5 * a * s * s if size.eager_attention else 0)
    # Checkpointing keeps each layer's input and recomputes one layer at a time.
    blocks = layers * 2 * s * h + full_layer if checkpointing else layers * full_layer
    logits = s * size.vocab * 4 * 3  # fp32 logits, their softmax and its gradient
    teacher_logits = s * size.vocab * 4 if teacher else 0
    return (blocks + logits + teacher_logits) / 1e9


def fixed_gb(size: ModelSize, world_size: int, sharded: bool, teacher_sharded: bool) -> float:
    """Weights, gradients and optimizer state (fp32: 4 + 4 + 8 bytes per parameter)."""
    state = size.trained_params * 16 / (world_size if sharded else 1)
    teacher = size.frozen_params * size.frozen_bytes / (world_size if teacher_sharded else 1)
    return (state + teacher) / 1e9


def max_micro_batch(memory_gb: float, fixed: float, per_row: float, training_key: str) -> int:
    """The most rows one process's forward and backward fit in `memory_gb`."""
    budget = memory_gb * _HEADROOM - fixed
    if budget < per_row:
        raise WftError(
            f"the model's weights, gradients and optimizer state (~{fixed:.0f} GB per "
            f"process) leave no room for one row of activations on a {memory_gb:.0f} GB GPU",
            f"use more GPUs with distributed.strategy=fsdp2, {training_key}."
            "activation_checkpointing=true, or a shorter data.seq_len")
    return int(budget // per_row)


def plan_batch(global_rows: int, world_size: int, max_micro: int, training_key: str,
               shards_per_process: int = 1) -> tuple[int, int]:
    """(micro_batch_size, grad_accum) for `global_rows` rows per step on `world_size`
    processes: the largest micro-batch up to `max_micro` such that each process's rows are
    the same number of micro-batches from each of its data shards."""
    unit = world_size * shards_per_process
    if global_rows % unit:
        processes = "1 process" if world_size == 1 else f"{world_size} processes"
        over = (processes if shards_per_process == 1 else
                f"{processes} reading {shards_per_process} data shards each")
        raise WftError(
            f"{training_key}.global_batch_size={global_rows} rows cannot be split evenly "
            f"over {over}",
            f"use a multiple of {unit}, e.g. {training_key}.global_batch_size="
            f"{max(unit, global_rows // unit * unit)}")
    rows, per_shard = global_rows // world_size, global_rows // unit
    micro = max(d for d in range(1, per_shard + 1)
                if per_shard % d == 0 and d <= max(max_micro, 1))
    return micro, rows // micro


def plan_for_run(spec, run, device: torch.device, world_size: int,
                 shards_per_process: int) -> tuple[int, int, str]:
    """(micro_batch_size, grad_accum, how they were chosen) for a stage run's
    `global_batch_size` on this GPU (its profile) and process count, every step reading each
    of a process's data shards equally; a micro_batch_size set in the recipe (always, on a
    CPU) caps the micro-batch."""
    key = run.training_key
    profile = spec.gpu_profile if spec.gpu_profile != "auto" else detect_profile(device)
    if profile is not None or device.type == "cuda":
        memory = (GPU_MEMORY_GB[profile] if profile else
                  torch.cuda.get_device_properties(device).total_memory / 1e9)
        size = ModelSize.of(run.model, run.extra_modules)
        settings = run.recipe.distributed
        teacher = bool(run.extra_modules)
        fixed = fixed_gb(size, world_size, settings.strategy == "fsdp2",
                         teacher and settings.teacher == "shard")
        per_row = row_gb(size, run.data.seq_len, spec.activation_checkpointing, teacher)
        # An objective may run more rows than it reads (unified's complementary masks).
        per_row *= getattr(run.objective, "forward_rows_per_row", 1.0)
        most = max_micro_batch(memory, fixed, per_row, key)
        basis = f"{profile or f'{memory:.0f} GB GPU'} profile: up to {most} rows fit"
        if "micro_batch_size" in spec.model_fields_set:
            most = min(most, spec.micro_batch_size)
            basis += f", {key}.micro_batch_size={spec.micro_batch_size} caps it"
    else:
        most = spec.micro_batch_size
        basis = f"CPU: micro-batch at most {key}.micro_batch_size"
    micro, accum = plan_batch(spec.global_batch_size, world_size, most, key, shards_per_process)
    return micro, accum, basis


def oom_error(step: int, micro: int, accum: int, training_key: str, checkpointing: bool,
              teacher: bool, peak_gb: float, planned: bool = False) -> WftError:
    """What to change after a CUDA out-of-memory error; the same global batch where it can.
    `planned`: global_batch_size sets the accumulation, so the micro-batch cap is the fix."""
    if micro > 1 and planned:
        fix = (f"{training_key}.micro_batch_size={micro // 2} (caps the micro-batch; "
               "global_batch_size keeps the global batch)")
    elif micro > 1:
        half = micro // 2
        fix = (f"{training_key}.micro_batch_size={half} {training_key}.grad_accum="
               f"{accum * micro // half}" if micro % 2 == 0 else
               f"{training_key}.micro_batch_size=1 {training_key}.grad_accum={accum * micro}")
        fix += " (the same global batch)"
    else:
        fix = "a shorter data.seq_len, or more GPUs with distributed.strategy=fsdp2"
    more = []
    if not checkpointing:
        more.append(f"{training_key}.activation_checkpointing=true")
    if teacher:
        more.append("distributed.teacher=shard")
    also = f"; also possible: {', '.join(more)}" if more else ""
    return WftError(
        f"CUDA out of memory at step {step + 1} with micro_batch_size={micro} (peak "
        f"{peak_gb:.1f} GB allocated); the run resumes from its last checkpoint",
        f"try {fix}{also}")
