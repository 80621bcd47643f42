"""BitLinear with Q-Sparse top-K activations vs without: forward+backward time ratio.

Both layers share one weight and run side by side in one process, alternating, on the same
input; the median of several repetitions is compared. The dense matmul kernels do not skip
the zeros, so the ratio is the price of the top-K selection during training (the Q-Sparse
paper reports ~35 % slower training for its reference implementation). No target is set.

    python bench/q_sparse.py [--sparsity 0.6] [--tokens 4096] [--sizes 1024 4096]
    python bench/q_sparse.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy

import torch

from _device import add_device_arguments, describe, layer_step_medians, resolve_device
from wftool.quant.bitlinear import BitLinear


def measure(size: int, tokens: int, sparsity: float, repeats: int, warmup: int,
            device: torch.device, dtype: str) -> tuple[float, float]:
    """Median seconds of one forward+backward step: (dense, sparse)."""
    torch.manual_seed(0)
    dense = BitLinear(size, size).to(device)
    sparse = copy.deepcopy(dense)
    sparse.sparsity = sparsity
    x = torch.randn(tokens, size, device=device, requires_grad=True)
    layers = {"dense": dense, "sparse": sparse}
    medians = layer_step_medians(layers, x, repeats, warmup, device, dtype)
    return medians["dense"], medians["sparse"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.6)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per layer")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    add_device_arguments(parser, default_device="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device, args.dtype)
    print(f"{describe(device, args.dtype)}, {args.tokens} tokens, forward+backward, "
          f"eager, median of {args.repeats}")
    print(f"{'shape':>11} {'dense ms':>9} {f'sparsity {args.sparsity:g} ms':>17} {'ratio':>6}")
    for size in args.sizes:
        dense, sparse = measure(size, args.tokens, args.sparsity, args.repeats, args.warmup,
                                device, args.dtype)
        print(f"{size:>5}x{size:<5} {dense * 1e3:>9.2f} {sparse * 1e3:>17.2f} "
              f"{sparse / dense:>6.3f}")


if __name__ == "__main__":
    main()
