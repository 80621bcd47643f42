"""Pretrain step throughput: wft's trainer vs a plain transformers loop, side by side.

Both train the same small Llama-shaped model (hidden 512, 4 layers) on batches of the same
shape, fp32 on CPU, alternating in one process. wft's number includes its data pipeline
(tokenization and packing); the plain loop reads pre-made token tensors. Target: ratio
(wft tokens/s / plain tokens/s) >= 0.9, for the full-precision model; the ternary student
adds BitLinear's quantization on top.

    python bench/train_step.py [--steps 6] [--rounds 3]
"""

from __future__ import annotations

import torch

from _setup import build_model, compare, make_trainer, step_bench_arguments, tokenizer
from wftool.model.checkpoint import TernaryMetadata
from wftool.recipe.schema import DataSpec
from wftool.train.objectives import LanguageModeling


def plain_loop(model, batch: int, seq_len: int, vocab: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    model.train()

    def step():
        ids = torch.randint(0, vocab, (batch, seq_len), generator=generator)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = step_bench_arguments(__doc__, batch=8, seq_len=256)
    args = parser.parse_args()
    tok = tokenizer()
    data = DataSpec(seq_len=args.seq_len, eval_fraction=0.0)
    tokens = args.batch * args.seq_len
    contenders = {
        "plain transformers loop (FP)": plain_loop(build_model(), args.batch, args.seq_len,
                                                   len(tok)),
        "wft pretrain (FP)": make_trainer(build_model(), tok, LanguageModeling(), data,
                                          args.batch).train_step,
        "wft pretrain (ternary)": make_trainer(
            build_model(ternary=True), tok, LanguageModeling(), data, args.batch,
            meta=TernaryMetadata("llama", "none", None)).train_step,
    }
    seconds = compare(contenders, args.steps, args.rounds)
    base = seconds["plain transformers loop (FP)"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
          f"batch {args.batch} x {args.seq_len} tokens")
    print(f"{'':32} {'s/step':>8} {'tokens/s':>10} {'vs plain':>9}")
    for name, best in seconds.items():
        print(f"{name:32} {best:>8.3f} {tokens / best:>10,.0f} {base / best:>9.3f}")
    print("target: wft pretrain (FP) vs plain >= 0.9")


if __name__ == "__main__":
    main()
