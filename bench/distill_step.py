"""Distillation step cost: distill step time / student-only step time, side by side.

The student (ternary, 4 layers, hidden 512 unless --hidden) trains on the same packed
batches with CE only, and with the full BitDistill objective (frozen full-precision teacher
forward, logits KL, Q/K/V relation loss at one layer). Target: ratio <= 1.5 on CPU, fp32.
The relation term costs batch x 32 heads x seq^2 whatever the width, so it weighs most on
narrow models. `--dtype bfloat16` runs both under bf16 autocast (the trainer's GPU path).

    python bench/distill_step.py [--steps 6] [--rounds 3] [--hidden 1024]
"""

from __future__ import annotations

from _device import describe
from _setup import (bench_device, build_model, compare, make_trainer, step_bench_arguments,
                    tokenizer)
from wftool.model.checkpoint import TernaryMetadata
from wftool.model.families import FAMILIES
from wftool.recipe.schema import DataSpec, DistillStage
from wftool.train.objectives import Distillation, LanguageModeling


def main() -> None:
    parser = step_bench_arguments(__doc__, batch=16, seq_len=128)
    args = parser.parse_args()
    device = bench_device(args)
    tok = tokenizer()
    data = DataSpec(seq_len=args.seq_len, eval_fraction=0.0)
    meta = TernaryMetadata("llama", "paper", None)
    teacher = build_model(seed=1, hidden=args.hidden).requires_grad_(False).eval()
    family = FAMILIES["llama"]
    distill = Distillation(teacher, DistillStage(attention_layer=-1), family, family, 4, 4)

    def student():
        return build_model(ternary=True, hidden=args.hidden)

    on = dict(device=device, dtype=args.dtype)
    contenders = {
        "student only (CE)": make_trainer(student(), tok, LanguageModeling(), data, args.batch,
                                          meta, **on).train_step,
        # the teacher goes to the device with the student, as in the distill stage
        "distill (CE + KL + relations)": make_trainer(student(), tok, distill, data, args.batch,
                                                      meta, extra_modules=[teacher],
                                                      **on).train_step,
    }
    seconds = compare(contenders, args.steps, args.rounds, device, args.warmup)
    base = seconds["student only (CE)"]
    print(f"{describe(device, args.dtype)}, batch {args.batch} x {args.seq_len} tokens, "
          f"hidden {args.hidden}, 4 layers")
    for name, best in seconds.items():
        print(f"{name:32} {best:>8.3f} s/step   ratio {best / base:.3f}")
    print("target: distill / student only <= 1.5")


if __name__ == "__main__":
    main()
