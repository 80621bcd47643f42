"""`wft unified` costs, side by side in one process on the same ternary student and batch:

1. step time of the unified objective / the pretrain objective: split batches with one
   copy per row (target <= 1.05; complementary masks use 1.5x the rows), and block
   diffusion's [clean | noisy] rows (twice the tokens: every row trains both objectives),
   with AdamW and with MuonClip;
2. the optimizer step's share of a training step, Muon vs AdamW (QK-clip included);
3. decode tokens/s of the three decoding modes of a student: autoregressive, block
   diffusion, and self-speculative (diffusion drafts, AR verifies).

    python bench/unified_step.py [--steps 6] [--rounds 3]
    python bench/unified_step.py --dtype bfloat16          # on a GPU
"""

from __future__ import annotations

import time

import torch

from _device import describe, synchronize
from _setup import (bench_device, build_model, compare, make_trainer, step_bench_arguments,
                    tokenizer)
from wftool.model.checkpoint import TernaryMetadata
from wftool.model.families import FAMILIES
from wftool.decoding import DecodeStats, Decoding, decode
from wftool.model.mask_token import DiffusionSettings, add_mask_token
from wftool.quant.ternary_linear import pack_ternary_layers
from wftool.recipe.schema import DataSpec, UnifiedStage
from wftool.train.objectives import LanguageModeling
from wftool.train.qk_clip import QKClip
from wftool.train.unified import UnifiedObjective


def unified(model, tok, mask_mode: str, clip: bool,
            attention: str = "bidirectional") -> UnifiedObjective:
    spec = UnifiedStage(curriculum=[{"until": 1.0, "dlm_weight": 1.0}], mask_mode=mask_mode,
                        attention=attention, qk_clip_tau=100.0 if clip else None)
    hooks = (QKClip(model, FAMILIES["llama"], 100.0),) if clip else ()
    return UnifiedObjective(spec, model.config.mask_token_id, 10_000, student=model,
                            hooks=hooks)


def student(tok):
    model = build_model(ternary=True)
    add_mask_token(model, tok)
    return model


def optimizer_share(trainer, steps: int, device) -> tuple[float, float]:
    """(optimizer step + after-step hooks seconds, whole step seconds), medians."""
    optimizer_seconds, step_seconds = [], []
    original = [opt.step for opt in trainer.optimizers]

    def timed_step(step, seconds):
        def run(*args, **kwargs):
            synchronize(device)
            start = time.perf_counter()
            result = step(*args, **kwargs)
            synchronize(device)
            seconds.append(time.perf_counter() - start)
            return result
        return run

    per_step: list[float] = []
    for opt, step in zip(trainer.optimizers, original):
        opt.step = timed_step(step, per_step)
    hooks = [(hook, hook.after_step) for hook in trainer.hooks]
    for hook, after in hooks:  # QK-clip's rescale belongs to the optimizer step
        hook.after_step = timed_step(after, per_step)
    for _ in range(steps):
        per_step.clear()
        synchronize(device)
        start = time.perf_counter()
        trainer.train_step()
        synchronize(device)
        step_seconds.append(time.perf_counter() - start)
        optimizer_seconds.append(sum(per_step))
    for opt, step in zip(trainer.optimizers, original):
        opt.step = step
    for hook, after in hooks:
        hook.after_step = after
    median = sorted(optimizer_seconds)[len(optimizer_seconds) // 2]
    return median, sorted(step_seconds)[len(step_seconds) // 2]


def main() -> None:
    args = step_bench_arguments(__doc__, batch=8, seq_len=256).parse_args()
    device = bench_device(args)
    tok = tokenizer()
    data = DataSpec(seq_len=args.seq_len, eval_fraction=0.0)
    meta = TernaryMetadata("llama", "none", None)
    on = dict(device=device, dtype=args.dtype, meta=meta)

    def trainer(objective_for, optimizer="adamw"):
        model = student(tok)
        return make_trainer(model, tok, objective_for(model), data, args.batch,
                            optimizer=optimizer, **on)

    trainers = {
        "pretrain (AdamW)": trainer(lambda m: LanguageModeling()),
        "unified split (AdamW)": trainer(lambda m: unified(m, tok, "split", False)),
        "unified complementary (AdamW)": trainer(lambda m: unified(m, tok, "complementary",
                                                                   False)),
        "unified block (AdamW)": trainer(lambda m: unified(m, tok, "split", False, "block")),
        "pretrain (Muon)": trainer(lambda m: LanguageModeling(), "muon"),
        "unified split (MuonClip)": trainer(lambda m: unified(m, tok, "split", True), "muon"),
    }
    seconds = compare({name: t.train_step for name, t in trainers.items()}, args.steps,
                      args.rounds, device, args.warmup)
    tokens = args.batch * args.seq_len
    print(f"{describe(device, args.dtype)}, batch {args.batch} x {args.seq_len} tokens, "
          f"hidden {args.hidden}, 4 layers, ternary student")
    print(f"{'':32} {'s/step':>8} {'tokens/s':>10}")
    for name, best in seconds.items():
        print(f"{name:32} {best:>8.3f} {tokens / best:>10,.0f}")
    split = seconds["unified split (AdamW)"] / seconds["pretrain (AdamW)"]
    print(f"unified split / pretrain step time = {split:.3f} (target <= 1.05)")
    print(f"unified complementary / pretrain = "
          f"{seconds['unified complementary (AdamW)'] / seconds['pretrain (AdamW)']:.3f}")
    print(f"unified block [clean | noisy] / pretrain = "
          f"{seconds['unified block (AdamW)'] / seconds['pretrain (AdamW)']:.3f} (2x the tokens)")
    print(f"unified split MuonClip / pretrain Muon = "
          f"{seconds['unified split (MuonClip)'] / seconds['pretrain (Muon)']:.3f}")
    for name in ("unified split (AdamW)", "unified split (MuonClip)"):
        optimizer, step = optimizer_share(trainers[name], args.steps, device)
        print(f"optimizer step share, {name}: {optimizer / step:.1%} "
              f"({optimizer * 1e3:.1f} of {step * 1e3:.1f} ms)")
    decode_report(tok, device)


def decode_report(tok, device, prompt_tokens: int = 32, new_tokens: int = 64) -> None:
    """Tokens/s of each decoding mode on the student with packed ternary layers (as `wft
    serve --backend torch` runs it). Its weights are random, so few diffusion predictions
    reach the confidence threshold: the rows show each mode's cost per forward; the forced
    row (4 tokens unmasked per forward) what a confident student gains. A trained student's
    numbers come from `wft eval`."""
    model = student(tok).to(device).eval()
    pack_ternary_layers(model)
    settings = DiffusionSettings(model.config.mask_token_id, block_size=16)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 2000, (prompt_tokens,), generator=generator).tolist()
               for _ in range(3)]
    modes = {"ar": Decoding("ar"), "diffusion (threshold 0.9)": Decoding("diffusion"),
             "diffusion (4 tokens/forward)": Decoding("diffusion", steps_per_block=4),
             "speculative": Decoding("speculative")}
    print(f"decoding, {prompt_tokens}-token prompts, {new_tokens} new tokens, block 16, "
          "greedy, random weights")
    print(f"{'':32} {'tokens/s':>10} {'tok/forward':>12} {'vs ar':>7}")
    speeds = {}
    for name, decoding in modes.items():
        list(decode(model, prompts[0], 8, decoding, settings=settings))  # warm-up
        stats = DecodeStats()
        for ids in prompts:
            list(decode(model, ids, new_tokens, decoding, settings=settings, stats=stats))
        speeds[name] = stats.tokens_per_second
        print(f"{name:32} {stats.tokens_per_second:>10,.1f} {stats.tokens_per_forward:>12.2f} "
              f"{stats.tokens_per_second / speeds['ar']:>7.2f}")


if __name__ == "__main__":
    main()
