"""Several processes, one run: the process group torchrun sets up, and FSDP2 or DDP around
the student.

torchrun starts one process per GPU with RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous in
the environment; `init_from_environment` joins them (NCCL on GPUs, gloo on CPUs, so the same
code runs in CPU tests). Nothing here decides what a rank computes: the trainer does, and
every rank enters every collective.

FSDP2 shards each decoder layer (`fully_shard`) and the rest of the model at the root.
Parameters are all-gathered in fp32, the master weights' dtype, and compute runs under the
trainer's bf16 autocast, so a ternary layer quantizes exactly the latent weights one GPU would
see (gathering bf16 would halve the traffic but move which weights round to 0).
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from wftool.errors import WftError

STRATEGIES = ("fsdp2", "ddp")
_TIMEOUT = datetime.timedelta(minutes=30)  # a checkpoint of a large model takes minutes


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment() -> None:
    """Join the process group torchrun describes in the environment (once)."""
    if dist.is_initialized() or not launched_by_torchrun():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    try:
        dist.init_process_group(backend, timeout=_TIMEOUT)
    except (RuntimeError, ValueError) as err:
        raise WftError(
            f"cannot join the other processes of this run ({backend}): {err}",
            "check --master-addr/--master-port and that every node runs the same command "
            "with its own --node-rank") from None


def process_device() -> torch.device:
    """This process's GPU (LOCAL_RANK picks it), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))
                            % torch.cuda.device_count())
    return torch.device("cpu")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a Hugging Face causal LM (`model.model.layers`)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise WftError(f"{type(model).__name__}: no decoder layers at model.layers, which "
                       "FSDP2 shards one by one",
                       "set distributed.strategy=ddp for this model")
    return layers


def shard_student(model: nn.Module, strategy: str, device: torch.device,
                  unused_parameters: bool = False) -> nn.Module:
    """Wrap the student for several processes; returns the module to call forward on.

    FSDP2 changes `model` in place (its parameters become DTensor shards), so `model`
    itself is what forward, state dicts and hooks use. DDP returns a wrapper for forward;
    `model` stays the plain module underneath."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model.to(device), device_ids=ids,
                                       find_unused_parameters=unused_parameters)
    if strategy != "fsdp2":
        raise ValueError(f"unknown strategy {strategy!r}")
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)  # embeddings, final norm, lm_head (tied weights stay one parameter)
    # After sharding: each GPU receives its shards, never the whole fp32 model at once.
    return model.to(device)


def place_teacher(teacher: nn.Module, how: str, device: torch.device) -> None:
    """The frozen teacher on this process: a full copy, or sharded like the student (it
    then all-gathers each layer for its forward, trading traffic for memory)."""
    teacher.to(device)
    if how == "shard" and dist.is_initialized():
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(teacher):
            fully_shard(layer)
        fully_shard(teacher)


def require_shared_directory(path: Path) -> None:
    """Several machines write one checkpoint: rank 0 assembles and marks what every rank
    wrote, so `path` must be one directory they all see. A file rank 0 writes must appear
    on every rank, else a clear error (not a hang, not a checkpoint missing shards)."""
    if not dist.is_initialized():
        return
    path.mkdir(parents=True, exist_ok=True)
    token = [f".wft-shared-{os.getpid()}-{time.time_ns()}"]
    dist.broadcast_object_list(token, src=0)
    probe = path / token[0]
    if dist.get_rank() == 0:
        probe.write_text("shared\n")
    dist.barrier()
    seen = torch.tensor([1.0 if probe.exists() else 0.0])
    dist.all_reduce(seen, op=dist.ReduceOp.MIN)  # gloo and NCCL both have MIN
    dist.barrier()
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    if seen.item() < 1:
        raise WftError(
            f"{path} is not one directory for all {dist.get_world_size()} processes (a file "
            "rank 0 wrote there is missing on another machine): checkpoints need storage "
            "every machine sees",
            "set output_dir to a shared file system (NFS, Lustre, a cloud's shared "
            "file system) mounted at the same path on every machine")


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as CPU tensors on rank 0 ({} elsewhere). Every rank must
    call it: FSDP2 gathers the shards. Tied weights come back as one tensor again, so
    `save_pretrained` stores them once, as it does for an unsharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    if weights and output is not None and output.weight is inputs.weight:
        tied = [name for name, param in model.named_parameters(remove_duplicate=False)
                if param is inputs.weight]
        for name in tied[1:]:
            weights[name] = weights[tied[0]]
    return weights


def to_full(value):
    """A DTensor (e.g. FSDP2's gradient norm) as the plain tensor it stands for."""
    full_tensor = getattr(value, "full_tensor", None)
    return full_tensor() if full_tensor is not None else value


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, in place (gloo has no AVG reduction, so SUM / world size)."""
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
