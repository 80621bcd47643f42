"""Distillation step cost: distill step time / student-only step time, side by side.

The student (ternary, 4 layers, hidden 512 unless --hidden) trains on the same packed
batches with CE only, and with the full BitDistill objective (frozen full-precision teacher
forward, logits KL, Q/K/V relation loss at one layer). Target: ratio <= 1.5 on CPU. The
relation term costs batch x 32 heads x seq^2 whatever the width, so it weighs most on
narrow models.

    python bench/distill_step.py [--steps 6] [--rounds 3] [--hidden 1024]
"""

from __future__ import annotations

import torch

from _setup import build_model, compare, make_trainer, step_bench_arguments, tokenizer
from wftool.model.checkpoint import TernaryMetadata
from wftool.model.families import FAMILIES
from wftool.recipe.schema import DataSpec, DistillStage
from wftool.train.objectives import Distillation, LanguageModeling


def main() -> None:
    parser = step_bench_arguments(__doc__, batch=16, seq_len=128)
    parser.add_argument("--hidden", type=int, default=512)
    args = parser.parse_args()
    tok = tokenizer()
    data = DataSpec(seq_len=args.seq_len, eval_fraction=0.0)
    meta = TernaryMetadata("llama", "paper", None)
    teacher = build_model(seed=1, hidden=args.hidden).requires_grad_(False).eval()
    family = FAMILIES["llama"]
    distill = Distillation(teacher, DistillStage(attention_layer=-1), family, family, 4, 4)

    def student():
        return build_model(ternary=True, hidden=args.hidden)

    contenders = {
        "student only (CE)": make_trainer(student(), tok, LanguageModeling(), data, args.batch,
                                          meta).train_step,
        "distill (CE + KL + relations)": make_trainer(student(), tok, distill, data, args.batch,
                                                      meta).train_step,
    }
    seconds = compare(contenders, args.steps, args.rounds)
    base = seconds["student only (CE)"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
          f"batch {args.batch} x {args.seq_len} tokens, hidden {args.hidden}, 4 layers")
    for name, best in seconds.items():
        print(f"{name:32} {best:>8.3f} s/step   ratio {best / base:.3f}")
    print("target: distill / student only <= 1.5")


if __name__ == "__main__":
    main()
