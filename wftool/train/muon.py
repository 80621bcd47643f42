"""Muon on FSDP2-sharded matrices: the full-matrix update, computed once per matrix.

Newton-Schulz orthogonalises a whole matrix; run on one process's row shard it would be a
different update (Megatron-LM #5961), and torch.optim.Muon does not take DTensors. Here the
momentum (an elementwise quantity) stays sharded; each matrix has an owner rank (matrix i
belongs to rank i mod world size) that gathers the rows of its update, orthogonalises the
full matrix and scatters the rows back, so every process applies exactly the update one
process would, and each matrix is orthogonalised once, not on every rank. The collectives
run one matrix after another (simple and exact; batching them per step would overlap the
communication).

`local_rows` / `scale_rows` give after-step hooks (a per-head QK-clip rescales rows of q_proj
and k_proj) the rows a process holds, so they can act on sharded weights without a gather.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz


def _is_dtensor(tensor) -> bool:
    return hasattr(tensor, "to_local") and hasattr(tensor, "device_mesh")


def local_rows(param) -> range:
    """The global rows this process holds of a row-sharded (FSDP2) matrix; all rows of a
    plain tensor. FSDP2 splits dim 0 like torch.chunk: ceil(rows / world) per rank."""
    if not _is_dtensor(param):
        return range(param.shape[0])
    rows = param.shape[0]
    rank, world = param.device_mesh.get_local_rank(), param.device_mesh.size()
    chunk = math.ceil(rows / world)
    start = min(rank * chunk, rows)
    held = param.to_local().shape[0]
    if held != max(0, min(chunk, rows - start)):  # a layout this scheme does not know
        raise RuntimeError(f"unexpected shard of {held} rows at rank {rank} of {world}")
    return range(start, start + held)


@torch.no_grad()
def scale_rows(param, rows: range, factor: float | torch.Tensor) -> None:
    """Multiply global rows `rows` of `param` by `factor` (a number, or one per row), on
    whichever process holds them."""
    held = local_rows(param)
    start, stop = max(rows.start, held.start), min(rows.stop, held.stop)
    if start >= stop:
        return
    local = param.to_local() if _is_dtensor(param) else param
    if torch.is_tensor(factor) and factor.ndim:
        factor = factor[start - rows.start: stop - rows.start].to(local.dtype).unsqueeze(-1)
    local[start - held.start: stop - held.start] *= factor


class ShardedMuon(torch.optim.Muon):
    """torch.optim.Muon for DTensor (FSDP2) parameters; same hyper-parameters, same update."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for index, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                self._update(param, group, owner=index % dist.get_world_size())
        return loss

    def _update(self, param, group, owner: int) -> None:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param.grad)
        grad = param.grad.to_local()
        buf = state["momentum_buffer"].to_local()
        momentum = group["momentum"]
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if group["nesterov"] else buf
        update = self._orthogonalised_rows(param, update, group, owner)
        lr = group["lr"]
        local = param.to_local()
        local.mul_(1 - lr * group["weight_decay"])
        local.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))

    @staticmethod
    def _orthogonalised_rows(param, update: torch.Tensor, group, owner: int) -> torch.Tensor:
        """Gather the update's rows on `owner`, Newton-Schulz there, scatter them back."""
        rank, world = dist.get_rank(), dist.get_world_size()
        rows, cols = param.shape
        chunk = math.ceil(rows / world)
        held = update.shape[0]
        padded = update.new_zeros(chunk, cols)  # collectives need equal pieces
        padded[:held] = update
        pieces = [torch.empty_like(padded) for _ in range(world)] if rank == owner else None
        dist.gather(padded, pieces, dst=owner)
        if rank == owner:
            full = torch.cat(pieces)[:rows]
            full = _zeropower_via_newtonschulz(full, group["ns_coefficients"],
                                               group["ns_steps"], group["eps"])
            full = torch.cat([full.to(update.dtype), full.new_zeros(chunk * world - rows, cols)
                              .to(update.dtype)])
            pieces = list(full.split(chunk))
        result = torch.empty_like(padded)
        dist.scatter(result, pieces, src=owner)
        return result[:held]
