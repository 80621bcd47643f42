"""Ternary packing speed: wft's TQ1_0 / TQ2_0 packers vs gguf-py's own quantizer.

Both start from the same ternarized 4096 x 4096 weight: wft packs the int8 codes, gguf-py
quantizes the float tensor `codes` (what it would have to be given). The bytes must be
identical. Throughput counts the weight's fp32 size (64 MiB). Target: >= 2x.
I2_S (BitNet.cpp's type) has no gguf-py quantizer: its line shows wft's speed alone, and
"round trip" means the read-back unpacker gives the codes back.

    python bench/export.py [--size 4096] [--repeats 5]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _setup import median_step_seconds
from gguf import GGMLQuantizationType, quants

from wftool.export.ternary_packing import pack_i2_s, pack_tq1_0, pack_tq2_0
from wftool.export.validate import unpack_i2_s
from wftool.quant.ternary import ternarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    weight = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    codes, delta = ternarize(weight)
    codes, delta = codes.numpy(), delta.item()
    as_float = codes.astype(np.float32)
    megabytes = weight.numel() * 4 / 2**20
    print(f"{args.size}x{args.size} weight ({megabytes:.0f} MiB fp32), median of {args.repeats}")
    print(f"{'type':6} {'gguf-py MB/s':>13} {'wft MB/s':>10} {'speed-up':>9} {'bytes':>10}")
    for name, pack, qtype in (("TQ2_0", pack_tq2_0, GGMLQuantizationType.TQ2_0),
                              ("TQ1_0", pack_tq1_0, GGMLQuantizationType.TQ1_0)):
        ours = pack(codes)
        reference = quants.quantize(as_float, qtype)
        same = "identical" if np.array_equal(ours, reference) else "DIFFERENT"
        ref_s = median_step_seconds(lambda q=qtype: quants.quantize(as_float, q), args.repeats)
        our_s = median_step_seconds(lambda p=pack: p(codes), args.repeats)
        print(f"{name:6} {megabytes / ref_s:>13.0f} {megabytes / our_s:>10.0f} "
              f"{ref_s / our_s:>9.2f} {same:>10}")
    packed = pack_i2_s(codes, delta)
    same = "round trip" if np.array_equal(unpack_i2_s(packed, codes.size)[0],
                                          codes.reshape(-1)) else "DIFFERENT"
    our_s = median_step_seconds(lambda: pack_i2_s(codes, delta), args.repeats)
    print(f"{'I2_S':6} {'-':>13} {megabytes / our_s:>10.0f} {'-':>9} {same:>10}")
    print("target: speed-up >= 2")


if __name__ == "__main__":
    main()
