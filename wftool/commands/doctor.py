"""`wft doctor`: what this installation can do (versions, devices, optional backends)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from pathlib import Path

from rich.console import Console
from rich.table import Table

# (import name, distribution name, what it enables)
OPTIONAL_BACKENDS = (
    ("wandb", "wandb", "W&B logging (extra: wandb)"),
    ("modal", "modal", "cloud launch on Modal (extra: cloud)"),
    ("llama_cpp", "llama-cpp-python", "GGUF validation and serving (extra: llamacpp)"),
    ("fastapi", "fastapi", "the `wft serve` HTTP app (extra: serve)"),
    ("uvicorn", "uvicorn", "the `wft serve` HTTP server (extra: serve)"),
)
CORE = ("wftool", "torch", "transformers", "tokenizers", "datasets", "safetensors", "gguf",
        "pydantic", "typer", "rich")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def bitnet_checkout() -> Path | None:
    """extern/BitNet when the optional submodule is checked out next to the package."""
    root = Path(__file__).resolve().parents[2] / "extern" / "BitNet"
    return root if (root / "setup_env.py").exists() else None


def skypilot_row() -> tuple[str, str, str]:
    """SkyPilot is a tool in its own environment (not importable here): wft runs its `sky`."""
    from wftool.launch.skypilot_task import SKY_INSTALL_HINT, find_sky_cli, sky_version

    sky = find_sky_cli()
    if sky is None:
        return ("skypilot", "not installed", f"cloud launch on SkyPilot: {SKY_INSTALL_HINT}")
    return ("skypilot", sky_version(sky) or "installed", f"cloud launch on SkyPilot ({sky})")


def distributed_row(device) -> tuple[str, str, str]:
    """What `--nproc-per-node N` would use here: the collective backend and the GPU
    profile that sizes a `training.global_batch_size`."""
    import torch.distributed as dist

    from wftool.train.gpu_profiles import detect_profile

    backends = [name for name, ok in (("nccl", dist.is_nccl_available()),
                                      ("gloo", dist.is_gloo_available())) if ok]
    backend = "nccl" if device.type == "cuda" else "gloo"
    profile = detect_profile(device) if device.type == "cuda" else None
    sizing = (f"GPU profile {profile}" if profile else
              "GPU memory read directly" if device.type == "cuda" else
              "micro-batch capped by training.micro_batch_size")
    return ("distributed", ", ".join(backends) or "none",
            f"--nproc-per-node uses {backend}; global_batch_size: {sizing}")


def doctor_rows() -> list[tuple[str, str, str]]:
    import torch

    from wftool.train.precision import resolve_precision

    rows = [("python", platform.python_version(), platform.platform())]
    for dist in CORE:
        rows.append((dist, _version(dist) or "missing", "required"))
    threads = f"{os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads"
    rows.append(("cpu", platform.machine(), threads))
    if torch.cuda.is_available():
        names = ", ".join(
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        )
        rows.append(("gpu", f"CUDA {torch.version.cuda}", names))
    else:
        rows.append(("gpu", "none", "-"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision("auto", device)
    rows.append(("precision", f"{precision.compute} on {device.type}",
                 f"training.precision=auto: {precision.describe()}"))
    rows.append(distributed_row(device))
    for module, dist, purpose in OPTIONAL_BACKENDS:
        found = importlib.util.find_spec(module) is not None
        rows.append((dist, (_version(dist) or "installed") if found else "not installed", purpose))
    rows.append(skypilot_row())
    bitnet = bitnet_checkout()
    rows.append((
        "extern/BitNet",
        "checked out" if bitnet else "not checked out",
        "I2_S runtime; get it with `git submodule update --init --recursive extern/BitNet`",
    ))
    return rows


def print_doctor(console: Console) -> None:
    table = Table(title="wft doctor", title_justify="left")
    for column in ("component", "status", "notes"):
        table.add_column(column)
    for row in doctor_rows():
        table.add_row(*row)
    console.print(table)
