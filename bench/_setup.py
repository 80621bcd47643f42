"""Shared set-up for the training benchmarks: a small Llama-shaped model and its trainer."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from wftool.model.families import FAMILIES
from wftool.model.surgery import convert_to_bitnet
from wftool.model.tokenizer import train_synthetic_tokenizer
from wftool.recipe.schema import DataSpec, Recipe, TrainingSpec
from wftool.train.trainer import StageRun, Trainer

MODEL = dict(model_type="llama", vocab_size=2048, hidden_size=512, intermediate_size=1536,
             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             max_position_embeddings=1024, tie_word_embeddings=True)


def step_bench_arguments(doc: str, batch: int, seq_len: int) -> argparse.ArgumentParser:
    """The options every step benchmark takes."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--seq-len", type=int, default=seq_len)
    return parser


def build_model(seed: int = 0, ternary: bool = False, hidden: int | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(MODEL)
    if hidden:  # same shape family, wider: FFN 3x, 64-dim heads
        values.update(hidden_size=hidden, intermediate_size=3 * hidden,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if ternary:
        convert_to_bitnet(model, FAMILIES["llama"])
    return model


def tokenizer():
    return train_synthetic_tokenizer(MODEL["vocab_size"])


def make_trainer(model, tok, objective, data: DataSpec, batch: int, meta=None) -> Trainer:
    workdir = Path(tempfile.mkdtemp(prefix="wft-bench-"))
    recipe = Recipe(name="bench", output_dir=str(workdir),
                    model={"config": MODEL, "tokenizer": "synthetic"})
    spec = TrainingSpec(max_steps=10_000, micro_batch_size=batch, lr=1e-4, warmup_steps=0,
                        log_every=10_000, eval_every=10_000, save_every=10_000)
    run = StageRun(recipe=recipe, stage="bench", output_dir=workdir, model=model, tokenizer=tok,
                   objective=objective, training=spec, data=data, meta=meta)
    trainer = Trainer(run)
    trainer.setup()
    return trainer


def median_step_seconds(step, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(contenders: dict, steps: int, rounds: int) -> dict[str, float]:
    """Best-of-rounds median step time of each contender, run alternately after a warm-up."""
    for step in contenders.values():
        step()
    seconds = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            seconds[name].append(median_step_seconds(step, steps))
    return {name: min(values) for name, values in seconds.items()}
