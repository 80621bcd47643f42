"""Scaling of multi-process training: tokens/s per process, 1 process vs N under torchrun.

Each run is the real `wft pretrain` on a converted student (4 layers, hidden 256 unless
--hidden), the same micro-batch per process, so N processes read N times the rows per
step. On CPUs every process gets one thread (what torchrun sets), the single process too, so
the ratio measures the cost of the collectives (gloo here, NCCL on GPUs), not of threads.
Efficiency = (tokens/s per process with N) / (tokens/s with 1); target on one machine:
>= 0.8 for FSDP2 and DDP.

    python bench/distributed_scaling.py [--nproc 2] [--steps 30] [--strategy fsdp2 ddp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def recipe(root: Path, hidden: int, seq_len: int, batch: int, steps: int) -> Path:
    config = {"model_type": "llama", "vocab_size": 512, "hidden_size": hidden,
              "intermediate_size": 2 * hidden, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": seq_len, "tie_word_embeddings": True}
    training = {"max_steps": steps, "micro_batch_size": batch, "lr": 1e-3, "warmup_steps": 2,
                "log_every": max(steps // 3, 1), "eval_every": steps, "save_every": steps, "precision": "fp32"}
    text = {"name": "scaling", "output_dir": str(root / "runs"),
            "model": {"config": config, "tokenizer": "synthetic"},
            "data": {"seq_len": seq_len, "eval_fraction": 0.01, "eval_batches": 1},
            "convert": {"output": str(root / "student")}, "pretrain": {"training": training}}
    path = root / "scaling.yaml"
    path.write_text(yaml.safe_dump(text))
    return path


def wft(*args: str, threads: int = 1) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, "-m", "wftool", *args], capture_output=True,
                            text=True, env=env)
    if result.returncode:
        sys.exit(result.stdout[-2000:] + result.stderr[-2000:])


def tokens_per_second(root: Path, output: str) -> float:
    """The trainer's own tok/s over the last third of the run, all processes together (the
    first step, which includes warm-up, is left out)."""
    lines = (root / output / "scaling" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["tok/s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4, help="rows per process per step")
    parser.add_argument("--strategy", nargs="+", default=["fsdp2", "ddp"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = str(recipe(root, args.hidden, args.seq_len, args.batch, args.steps))
        wft("convert", path)
        wft("pretrain", path, f"output_dir={root / 'one'}")
        single = tokens_per_second(root, "one")
        print(f"CPU, {os.cpu_count()} cores, one thread per process; 4 layers, hidden "
              f"{args.hidden}, {args.batch} x {args.seq_len} tokens per process per step, "
              f"{args.steps} steps (tok/s of the last third)")
        print(f"{'1 process':22} {single:>10,.0f} tok/s")
        for strategy in args.strategy:
            wft("pretrain", path, f"output_dir={root / strategy}",
                f"distributed.strategy={strategy}", "--nproc-per-node", str(args.nproc))
            total = tokens_per_second(root, strategy)
            per_process = total / args.nproc
            print(f"{f'{args.nproc} processes, {strategy}':22} {total:>10,.0f} tok/s   "
                  f"{per_process:,.0f} per process   efficiency {per_process / single:.2f}")
    print("target: efficiency >= 0.8 on one machine")


if __name__ == "__main__":
    main()
