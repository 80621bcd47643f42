"""BitLinear vs nn.Linear: forward+backward time ratio, fp32 or bf16 autocast, CPU or GPU.

Both layers run side by side in one process, alternating, on the same input, and the
median of several repetitions is compared. Targets, for fp32 on CPU: <= 1.15 eager,
<= 1.05 compiled. `--dtype bfloat16` keeps fp32 weights and input and runs forward+backward
under bf16 autocast, as the trainer does on GPUs (both layers under the same autocast); no
target is set for it, nor for fp32 on a GPU.

    python bench/bitlinear.py [--tokens 4096] [--repeats 7] [--no-compile]
    python bench/bitlinear.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from _device import add_device_arguments, describe, layer_step_medians, resolve_device
from wftool.quant.bitlinear import BitLinear

TARGETS = {"eager": 1.15, "compiled": 1.05}  # fp32 on CPU


def measure(size: int, tokens: int, repeats: int, warmup: int, compiled: bool,
            device: torch.device, dtype: str) -> tuple[float, float]:
    torch.manual_seed(0)
    linear = nn.Linear(size, size, bias=False, device=device)
    bit = BitLinear(size, size).to(device)
    bit.weight.data.copy_(linear.weight.data)
    x = torch.randn(tokens, size, device=device, requires_grad=True)
    layers = {"linear": linear, "bitlinear": bit}
    if compiled:
        layers = {k: torch.compile(v) for k, v in layers.items()}
    medians = layer_step_medians(layers, x, repeats, warmup, device, dtype)
    return medians["linear"], medians["bitlinear"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per layer")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--no-compile", action="store_true")
    add_device_arguments(parser, default_device="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device, args.dtype)
    with_targets = device.type == "cpu" and args.dtype == "float32"
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    print(f"{describe(device, args.dtype)}, {args.tokens} tokens, forward+backward, "
          f"median of {args.repeats}")
    print(f"{'shape':>11} {'mode':>9} {'nn.Linear ms':>13} {'BitLinear ms':>13} "
          f"{'ratio':>6}" + (f" {'target':>7}" if with_targets else ""))
    for size in args.sizes:
        for mode in modes:
            base, bit = measure(size, args.tokens, args.repeats, args.warmup,
                                mode == "compiled", device, args.dtype)
            ratio = bit / base
            row = (f"{size:>5}x{size:<5} {mode:>9} {base * 1e3:>13.2f} {bit * 1e3:>13.2f} "
                   f"{ratio:>6.3f}")
            if with_targets:
                verdict = "ok" if ratio <= TARGETS[mode] else "MISS"
                row += f" {'<=' + str(TARGETS[mode]):>7} {verdict}"
            print(row)
    if not with_targets:
        print("(targets <= 1.15 eager, <= 1.05 compiled are for fp32 on CPU; none set here)")


if __name__ == "__main__":
    main()
