"""Run by torchrun (2 gloo processes) from test_qk_clip.py: QKClip on a tiny Llama (GQA, with
q/k biases) whose decoder layers and root FSDP2 shards by rows, each rank reading half of a
batch, against QKClip on the whole model reading the whole batch. Rank 0 writes the largest
differences to argv[1] as JSON."""

import copy
import json
import math
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

from wftool.model.families import FAMILIES
from wftool.train.qk_clip import QKClip

FAMILY = FAMILIES["llama"]
TAU = 10.0
Q_SCALES = [[4, 30, 6, 3], [25, 5, 30, 4]]  # per layer and head: some heads above TAU
K_SCALE = 20.0


def build() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, num_hidden_layers=2, vocab_size=64,
                         attention_bias=True, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer, scales in zip(model.model.layers, Q_SCALES):
            attention = layer.self_attn
            width = attention.head_dim
            for head, scale in enumerate(scales):
                attention.q_proj.weight[head * width:(head + 1) * width] *= scale
                attention.q_proj.bias[head * width:(head + 1) * width] *= scale
            attention.k_proj.weight *= K_SCALE
    return model


def one_step(hook: QKClip, model, input_ids: torch.Tensor) -> None:
    """A training step's forward and backward (FSDP2 reshards the root's parameters only
    in backward), no optimizer: the clip is the only change to the weights."""
    hook.before_step(0)
    model(input_ids=input_ids, use_cache=False).logits.float().square().mean().backward()
    hook.after_step(0)


def maxima_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    """What one process reading `input_ids` tracks (every rank calls it alike: the
    all-reduce of equal values changes nothing)."""
    probe = QKClip(copy.deepcopy(model), FAMILY, math.inf)
    one_step(probe, probe.model, input_ids)
    return probe.last_maxima


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = build()
    batch = torch.randint(0, 64, (2 * world, 12), generator=torch.Generator().manual_seed(1))
    halves = batch.chunk(world)
    differ = not torch.equal(maxima_of(reference, halves[0]), maxima_of(reference, halves[1]))

    sharded = copy.deepcopy(reference)
    sharded_hook = QKClip(sharded, FAMILY, TAU)  # built before sharding, as the trainer does
    for layer in sharded.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    one_step(sharded_hook, sharded, halves[rank])

    reference_hook = QKClip(reference, FAMILY, TAU)
    one_step(reference_hook, reference, batch)

    weight_error = max(float((p.full_tensor() - q).abs().max())
                       for p, q in zip(sharded.parameters(), reference.parameters()))
    maxima_error = float((sharded_hook.last_maxima - reference_hook.last_maxima).abs().max())
    found = {key: float(value) for key, value in sharded_hook.metrics().items()}
    expected = {key: float(value) for key, value in reference_hook.metrics().items()}
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"weight_error": weight_error, "maxima_error": maxima_error,
                       "max_logit": expected["qk_max_logit"],
                       "clipped_heads": found["qk_clipped_heads"],
                       "reference_clipped": expected["qk_clipped_heads"],
                       "ranks_saw_different_maxima": differ}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
