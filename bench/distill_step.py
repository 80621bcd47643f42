"""Distillation step cost: distill step time / student-only step time, side by side.

The student (ternary, hidden 512, 4 layers) trains on the same packed batches with CE only,
and with the full BitDistill objective (frozen full-precision teacher forward, logits KL,
Q/K/V relation loss at one layer). Target: ratio <= 1.5 on CPU.

    python bench/distill_step.py [--steps 6] [--rounds 3]
"""

from __future__ import annotations

import argparse

import torch

from _setup import build_model, compare, make_trainer, tokenizer
from wftool.model.checkpoint import TernaryMetadata
from wftool.model.families import FAMILIES
from wftool.recipe.schema import DataSpec, DistillStage
from wftool.train.stage_objectives import Distillation, LanguageModeling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    tok = tokenizer()
    data = DataSpec(seq_len=args.seq_len, eval_fraction=0.0)
    meta = TernaryMetadata("llama", "paper", None)
    teacher = build_model(seed=1).requires_grad_(False).eval()
    family = FAMILIES["llama"]
    distill = Distillation(teacher, DistillStage(attention_layer=-1), family, family, 4, 4)
    contenders = {
        "student only (CE)": make_trainer(build_model(ternary=True), tok, LanguageModeling(),
                                          data, args.batch, meta).train_step,
        "distill (CE + KL + relations)": make_trainer(build_model(ternary=True), tok, distill,
                                                      data, args.batch, meta).train_step,
    }
    seconds = compare(contenders, args.steps, args.rounds)
    base = seconds["student only (CE)"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
          f"batch {args.batch} x {args.seq_len} tokens")
    for name, best in seconds.items():
        print(f"{name:32} {best:>8.3f} s/step   ratio {best / base:.3f}")
    print("target: distill / student only <= 1.5")


if __name__ == "__main__":
    main()
