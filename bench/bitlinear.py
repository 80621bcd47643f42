"""BitLinear vs nn.Linear: forward+backward time ratio on this machine, fp32.

Both layers run side by side in one process, alternating, on the same input, and the
median of several repetitions is compared. Targets: <= 1.15 eager, <= 1.05 compiled.

    python bench/bitlinear.py [--tokens 4096] [--repeats 7] [--no-compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from wftool.quant.bitlinear import BitLinear

TARGETS = {"eager": 1.15, "compiled": 1.05}


def _step(layer: nn.Module, x: torch.Tensor) -> None:
    out = layer(x)
    out.backward(torch.ones_like(out))


def _time(layer: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    _step(layer, x)
    return time.perf_counter() - start


def measure(size: int, tokens: int, repeats: int, compiled: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    linear = nn.Linear(size, size, bias=False)
    bit = BitLinear(size, size)
    bit.weight.data.copy_(linear.weight.data)
    x = torch.randn(tokens, size, requires_grad=True)
    layers = {"linear": linear, "bitlinear": bit}
    if compiled:
        layers = {k: torch.compile(v) for k, v in layers.items()}
    for layer in layers.values():  # warm-up (and compilation)
        for _ in range(2):
            _step(layer, x)
    times = {k: [] for k in layers}
    for _ in range(repeats):
        for name, layer in layers.items():
            times[name].append(_time(layer, x))
    return statistics.median(times["linear"]), statistics.median(times["bitlinear"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, "
          f"{args.tokens} tokens, forward+backward, median of {args.repeats}")
    print(f"{'shape':>11} {'mode':>9} {'nn.Linear ms':>13} {'BitLinear ms':>13} "
          f"{'ratio':>6} {'target':>7}")
    for size in args.sizes:
        for mode in modes:
            base, bit = measure(size, args.tokens, args.repeats, mode == "compiled")
            ratio = bit / base
            verdict = "ok" if ratio <= TARGETS[mode] else "MISS"
            print(f"{size:>5}x{size:<5} {mode:>9} {base * 1e3:>13.1f} {bit * 1e3:>13.1f} "
                  f"{ratio:>6.3f} {'<=' + str(TARGETS[mode]):>7} {verdict}")


if __name__ == "__main__":
    main()
