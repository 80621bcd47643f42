"""Run by torchrun (2 gloo processes) from test_distributed.py: ShardedMuon on FSDP2 shards
against torch.optim.Muon on the whole matrices, and scale_rows on shards against the same
rescale of the whole matrix. Rank 0 writes the largest differences to argv[1] as JSON."""

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from wftool.train.muon import ShardedMuon, local_rows, scale_rows

# Row counts that split evenly, unevenly, and leave rank 1 with no rows at all.
SHAPES = [(8, 6), (7, 4), (1, 3), (5, 5)]
STEPS = 3


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.ModuleList([nn.Linear(cols, rows, bias=False) for rows, cols in SHAPES])


def gradients(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(rows, cols, generator=generator) for rows, cols in SHAPES]


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    reference = build()
    sharded = copy.deepcopy(reference)
    for layer in sharded:  # each matrix its own FSDP2 unit, sharded by rows
        fully_shard(layer)
    kwargs = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    plain_muon = torch.optim.Muon(reference.parameters(), **kwargs)
    sharded_muon = ShardedMuon(sharded.parameters(), **kwargs)
    for step in range(STEPS):
        for (plain, shard), grad in zip(zip(reference, sharded), gradients(step)):
            plain.weight.grad = grad.clone()
            rows = local_rows(shard.weight)
            local = grad[rows.start:rows.stop].clone()
            shard.weight.grad = torch.distributed.tensor.DTensor.from_local(
                local, shard.weight.device_mesh, shard.weight.placements,
                shape=grad.shape, stride=grad.stride())
        plain_muon.step()
        sharded_muon.step()
    update_error = max(float((p.full_tensor() - q).abs().max())
                       for p, q in zip(sharded.parameters(), reference.parameters()))
    moved = max(float((q - build_param).abs().max())
                for q, build_param in zip(reference.parameters(), build().parameters()))
    # A per-head rescale of rows 2..6 (factor per row), as a QK-clip would apply.
    factors = torch.linspace(0.5, 0.9, 4)
    scale_rows(sharded[0].weight, range(2, 6), factors)
    with torch.no_grad():
        reference[0].weight[2:6] *= factors.unsqueeze(-1)
    scale_error = float((sharded[0].weight.full_tensor() - reference[0].weight).abs().max())
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"update_error": update_error, "moved": moved,
                       "scale_error": scale_error}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
