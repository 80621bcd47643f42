"""Pretrain step throughput: wft's trainer vs a plain transformers loop, side by side.

All train the same small Llama-shaped model (hidden 512, 4 layers) on batches of the same
shape, alternating in one process. wft's number includes its data pipeline (tokenization
and packing); the plain loop reads pre-made token tensors. Target: ratio (wft tokens/s /
plain tokens/s) >= 0.9, for the full-precision model; the ternary student adds BitLinear's
quantization on top, and its line against the plain full-precision loop is what a ternary
run costs over ordinary training.

fp32 by default; `--dtype bfloat16` runs every contender with fp32 weights under bf16
autocast (the trainer's GPU path, BitLinear's bf16 matmuls), the plain loop included.
On a CPU without bf16 instructions it is emulated and slow: there use a small model
(--hidden 128 --seq-len 64).

    python bench/train_step.py [--steps 6] [--rounds 3]
    python bench/train_step.py --dtype bfloat16          # on a GPU (the default device)
    python bench/train_step.py --smollm2 --batch 4 --steps 2 --rounds 2   # the real 135M model

`--smollm2` trains the real SmolLM2-135M-Instruct (extra smollm2; 30 layers, hidden 576,
vocabulary 49,152) instead of the small model: every contender gets its own copy.
"""

from __future__ import annotations

import torch

from _device import autocast, describe
from _setup import (bench_device, build_model, compare, make_trainer, smollm2,
                    step_bench_arguments, tokenizer)
from wftool.model.checkpoint import TernaryMetadata
from wftool.recipe.schema import DataSpec
from wftool.train.objectives import LanguageModeling


def plain_loop(model, batch: int, seq_len: int, vocab: int, device: torch.device, dtype: str):
    model.to(device)  # fp32 weights, as the trainer's masters
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()

    def step():
        ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
        ids = ids.to(device, non_blocking=True)  # host batches, as the trainer's
        with autocast(device, dtype):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = step_bench_arguments(__doc__, batch=8, seq_len=256)
    parser.add_argument("--smollm2", action="store_true",
                        help="the real SmolLM2-135M-Instruct (extra smollm2)")
    args = parser.parse_args()
    device = bench_device(args)
    if args.smollm2:
        tok = smollm2()[1]
        def model(ternary=False):
            return smollm2(ternary)[0]
        sub_norm, shape = "paper", "SmolLM2-135M-Instruct (30 layers, hidden 576)"
    else:
        tok = tokenizer()
        def model(ternary=False):
            return build_model(ternary=ternary, hidden=args.hidden)
        sub_norm, shape = "none", f"hidden {args.hidden}, 4 layers"
    data = DataSpec(seq_len=args.seq_len, eval_fraction=0.0)
    tokens = args.batch * args.seq_len
    on = dict(device=device, dtype=args.dtype)
    contenders = {
        "plain transformers loop (FP)": plain_loop(model(), args.batch, args.seq_len, len(tok),
                                                   **on),
        "wft pretrain (FP)": make_trainer(model(), tok, LanguageModeling(), data, args.batch,
                                          **on).train_step,
        "wft pretrain (ternary)": make_trainer(
            model(ternary=True), tok, LanguageModeling(), data, args.batch,
            meta=TernaryMetadata("llama", sub_norm, None), **on).train_step,
    }
    seconds = compare(contenders, args.steps, args.rounds, device, args.warmup)
    base = seconds["plain transformers loop (FP)"]
    print(f"{describe(device, args.dtype)}, batch {args.batch} x {args.seq_len} tokens, {shape}")
    print(f"{'':32} {'s/step':>8} {'tokens/s':>10} {'vs plain':>9}")
    for name, best in seconds.items():
        print(f"{name:32} {best:>8.3f} {tokens / best:>10,.0f} {base / best:>9.3f}")
    ternary = seconds["wft pretrain (ternary)"]
    print(f"ternary student / plain FP loop = {base / ternary:.3f} (tokens/s; "
          f"ternary / wft FP = {seconds['wft pretrain (FP)'] / ternary:.3f})")
    print("target: wft pretrain (FP) vs plain >= 0.9")


if __name__ == "__main__":
    main()
