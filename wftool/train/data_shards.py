"""The training data of one process: its share of the run's data shards.

A run splits its training documents into a fixed number of shards (the process count of its
first start, or `distributed.data_shards`). Process `rank` of `world` owns shards rank,
rank + world, ... and reads its micro-batches from them in turn, so every optimizer step
reads the same number of rows from every shard whatever the process count. The data
position is kept per shard: a run stopped on 2 processes resumes on 1 (reading both shards)
or on 4 (with 4 shards) exactly where it stopped, never skipping or repeating a document.
"""

from __future__ import annotations

from wftool.data.packing import build_stream
from wftool.errors import WftError


def check_layout(shards: int, world_size: int, grad_accum: int, training_key: str,
                 micro_batch_size: int, saved_rows: int | None = None,
                 from_checkpoint: bool = False) -> None:
    """Refuse a process count that cannot share `shards` evenly, or a grad_accum that would
    leave a shard out of a step; the hint keeps the global batch of the saved run."""
    if shards % world_size:
        counts = ", ".join(str(n) for n in range(1, shards + 1) if shards % n == 0)
        if not from_checkpoint:
            raise WftError(
                f"distributed.data_shards={shards} cannot be shared evenly by {world_size} "
                "processes",
                f"set distributed.data_shards to a multiple of {world_size}, or leave it "
                "unset (one shard per process)")
        raise WftError(
            f"this run's training data is split into {shards} shards, which {world_size} "
            "processes cannot share evenly",
            f"run it on {counts} processes (distributed.data_shards is fixed by the run's "
            "first checkpoint; set resume.mode=never to start over with another split)")
    per_process = shards // world_size
    if grad_accum % per_process:
        keep = ""
        if saved_rows and saved_rows % (micro_batch_size * world_size) == 0:
            accum = saved_rows // (micro_batch_size * world_size)
            if accum % per_process == 0:
                keep = (f" ({training_key}.grad_accum={accum} keeps the run's global batch of "
                        f"{saved_rows} rows)")
        readers = ("this process reads" if world_size == 1
                   else f"each of the {world_size} processes reads")
        raise WftError(
            f"{readers} {per_process} of the run's {shards} data shards, one micro-batch from "
            f"each in turn, and {training_key}.grad_accum={grad_accum} micro-batches per step "
            "would leave some out of a step",
            f"set {training_key}.grad_accum to a multiple of {per_process}{keep}")


class ShardedStream:
    """Micro-batches of this process's shards, one shard after the other."""

    def __init__(self, data, tokenizer, shards: int, rank: int, world_size: int):
        self.shards = shards
        self.owned = list(range(rank, shards, world_size))
        # Shard s of S is what `build_stream` calls rank s of S: one shard per process (the
        # usual case) reads exactly what a process of an S-process run reads.
        self.streams = {s: build_stream(data, tokenizer, "train", s, shards) for s in self.owned}
        self._turn = 0

    def next_batch(self, batch_size: int) -> dict:
        shard = self.owned[self._turn % len(self.owned)]
        self._turn += 1
        return self.streams[shard].next_batch(batch_size)

    def state_dict(self) -> dict:
        """Positions of the shards this process owns (the trainer saves one file per rank)."""
        return {"shards": self.shards,
                "positions": {str(s): self.streams[s].state_dict() for s in self.owned}}

    def load_state_dict(self, states: dict[int, dict]) -> None:
        """`states`: every shard's position, from all the saved ranks' files."""
        for shard in self.owned:
            self.streams[shard].load_state_dict(states[shard])
        self._turn = 0


def saved_positions(rank_states: list[dict]) -> tuple[int, dict[int, dict]]:
    """(shard count, position per shard) from the data states every rank saved. A state
    from before shards is one process's single stream: shard 0 of 1."""
    shards, positions = None, {}
    for state in rank_states:
        if "shards" not in state:  # one stream: a single-process run
            return 1, {0: state}
        shards = state["shards"]
        positions.update({int(k): v for k, v in state["positions"].items()})
    missing = sorted(set(range(shards or 0)) - set(positions))
    if shards is None or missing:
        raise ValueError(f"data positions of shards {missing} are missing")
    return shards, positions
