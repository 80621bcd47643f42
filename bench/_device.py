"""Where and in what precision a benchmark runs, and a clock that is right on GPUs.

`--dtype bfloat16` means what the trainer does on GPUs: fp32 weights and inputs, forward and
backward under bf16 autocast (backward outside the autocast block, as in `Trainer`). CUDA
kernels run asynchronously, so every clock read waits for the device first.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PRECISION = {"float32": "fp32", "bfloat16": "bf16"}  # --dtype -> TrainingSpec.precision


def add_device_arguments(parser: argparse.ArgumentParser, default_device: str) -> None:
    parser.add_argument("--device", default=default_device,
                        help=f"cpu, cuda, cuda:1 or auto (a GPU if any); default {default_device}")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="bfloat16: fp32 weights, forward+backward under bf16 autocast "
                             "(the trainer's GPU path); slow where a CPU emulates bf16")


def resolve_device(name: str, dtype: str = "float32") -> torch.device:
    """The device `--device name` asks for, refused with a short message where torch has none
    (or it cannot compute in `dtype`)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"--device {name}: not a torch device (cpu, cuda, cuda:1, auto)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise SystemExit(f"--device {name}: the benchmarks run on cpu or cuda")
    if not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {torch.__version__} sees no CUDA GPU here "
                         "(a CPU build of torch, or no driver); run it on a GPU machine, or "
                         "use --device cpu")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise SystemExit(f"--device {name}: there are {torch.cuda.device_count()} GPUs here "
                         f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    device = torch.device("cuda", index)
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise SystemExit(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bf16 "
                         "support; use --dtype float32")
    return device


def autocast(device: torch.device, dtype: str):
    """The forward's precision context: bf16 autocast, or nothing for fp32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, *args) -> float:
    """Seconds `fn(*args)` takes on `device`: waits for queued work before starting the clock
    and for `fn`'s own work before stopping it."""
    synchronize(device)
    start = time.perf_counter()
    fn(*args)
    synchronize(device)
    return time.perf_counter() - start


def layer_step(layer, x: torch.Tensor, device: torch.device, dtype: str) -> None:
    """One forward (under `dtype` autocast) and backward of `layer` on `x`."""
    with autocast(device, dtype):
        out = layer(x)
    out.backward(torch.ones_like(out))  # outside autocast, as in the trainer


def layer_step_medians(layers: dict, x: torch.Tensor, repeats: int, warmup: int,
                       device: torch.device, dtype: str) -> dict[str, float]:
    """Median seconds of `layer_step` per layer: warmed up, then timed alternately."""
    for layer in layers.values():  # warm-up (and compilation, cuBLAS set-up)
        for _ in range(warmup):
            layer_step(layer, x, device, dtype)
    times = {name: [] for name in layers}
    for _ in range(repeats):
        for name, layer in layers.items():
            times[name].append(timed(device, layer_step, layer, x, device, dtype))
    return {name: statistics.median(values) for name, values in times.items()}


def describe(device: torch.device, dtype: str) -> str:
    """Header text: torch version, device and precision."""
    if device.type == "cuda":
        where = f"{device} ({torch.cuda.get_device_name(device)})"
    else:
        where = f"cpu ({torch.get_num_threads()} threads)"
    if dtype == "bfloat16":
        precision = "bf16 autocast, fp32 weights"
    elif device.type == "cuda":  # TF32 changes fp32 matmul speed a lot on GPUs
        precision = f"fp32 (matmul precision {torch.get_float32_matmul_precision()})"
    else:
        precision = "fp32"
    return f"torch {torch.__version__}, {where}, {precision}"
