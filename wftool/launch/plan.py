"""What `wft launch` sends, resolved once from the recipe's `launch` section and the
command-line flags, and taken by every backend (SkyPilot, Modal).

Pure: no network, no SkyPilot or Modal import, so tests and `--dry-run` check it offline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from wftool.errors import WftError
from wftool.recipe.schema import Recipe
from wftool.stage_registry import TRAINING_STAGES

# Stages `wft launch --stage` accepts: each training stage, or the whole pipeline.
LAUNCH_STAGES = tuple(s.name for s in TRAINING_STAGES) + ("pipeline",)
# Where a bucket (SkyPilot) or volume (Modal) is mounted on the remote machine: the recipe's
# output_dir points there, so checkpoints outlive the node and a restarted job resumes.
REMOTE_RUNS_DIR = "/wft-runs"
# Where the resolved recipe lands on the remote machine.
REMOTE_RECIPE_PATH = "~/wft-recipe.yaml"
_GPUS = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)(?::([0-9]+))?$")


@dataclass(frozen=True)
class LaunchFlags:
    """Command-line flags of `wft launch`; None = take the recipe's `launch` value."""

    backend: str | None = None
    cloud: str | None = None  # -> launch.infra
    gpus: str | None = None  # -> launch.accelerators
    nodes: int | None = None
    spot: bool | None = None
    bucket: str | None = None


@dataclass(frozen=True)
class LaunchPlan:
    """One stage (or the pipeline) of one recipe on one set of machines."""

    recipe: Recipe  # resolved; output_dir already points at the remote runs directory
    stage: str  # a training stage, or "pipeline"
    recipe_text: str  # `recipe` as YAML: the file the remote `wft` reads
    backend: str  # "skypilot" | "modal"
    infra: str | None  # SkyPilot infra (cloud[/region[/zone]]); None: any enabled cloud
    accelerators: str  # "H100:8" as given
    gpu_type: str  # "H100"
    gpus_per_node: int  # 8
    nodes: int
    use_spot: bool
    disk_size: int  # GB per node
    network_tier: str | None
    bucket: str | None  # SkyPilot: checkpoints bucket mounted at REMOTE_RUNS_DIR
    volume: str  # Modal: Volume name mounted at REMOTE_RUNS_DIR
    secrets: tuple[str, ...]  # environment variable NAMES; values never enter the plan
    max_restarts: int
    job_name: str
    extras: tuple[str, ...]  # pip extras the remote install needs, e.g. ("wandb",)
    warnings: tuple[str, ...] = field(default=())

    @property
    def cloud(self) -> str | None:
        """The cloud part of `infra` (`aws` of `aws/us-east-1`), lower case."""
        return self.infra.split("/")[0].lower() if self.infra else None

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def output_dir(self) -> str:
        return self.recipe.output_dir

    def wft_args(self, recipe_path: str = REMOTE_RECIPE_PATH) -> list[str]:
        """`wft <stage> <recipe>`: the command before any torchrun flags."""
        return ["wft", self.stage, recipe_path]


def parse_gpus(text: str) -> tuple[str, int]:
    """`H100:8` -> ("H100", 8); `L4` -> ("L4", 1)."""
    match = _GPUS.match(text.strip()) if text else None
    if not match:
        raise WftError(f"--gpus {text!r} is not TYPE[:COUNT]",
                       "e.g. --gpus H100:8, --gpus A100-80GB:4 or --gpus L4")
    count = int(match.group(2) or 1)
    if count < 1:
        raise WftError(f"--gpus {text!r}: the GPU count must be at least 1",
                       "e.g. --gpus H100:1")
    return match.group(1), count


def build_plan(recipe: Recipe, stage: str, flags: LaunchFlags = LaunchFlags()) -> LaunchPlan:
    """The recipe's `launch` section with the flags on top; the recipe's output_dir moved
    to the remote runs directory when checkpoints go to a bucket or a volume."""
    if stage not in LAUNCH_STAGES:
        raise WftError(f"--stage {stage!r} cannot be launched",
                       f"stages: {', '.join(LAUNCH_STAGES)}")
    launch = recipe.launch
    backend = flags.backend or launch.backend
    if backend not in ("skypilot", "modal"):
        raise WftError(f"--backend {backend!r} is not a launch backend",
                       "use --backend skypilot or --backend modal")
    accelerators = flags.gpus or launch.accelerators
    gpu_type, gpus_per_node = parse_gpus(accelerators)
    nodes = launch.nodes if flags.nodes is None else flags.nodes
    bucket = flags.bucket if flags.bucket is not None else launch.bucket
    if backend == "modal":
        bucket = None  # Modal keeps checkpoints on its Volume (launch.volume)
    persistent = backend == "modal" or bool(bucket)
    remote = recipe.model_copy(deep=True)
    if persistent:
        remote.output_dir = REMOTE_RUNS_DIR
    logging = recipe.logging
    extras = ((("wandb",) if logging.wandb else ()) + (("tensorboard",) if logging.tensorboard
                                                        else ()) + _storage_extras(recipe))
    return LaunchPlan(
        recipe=remote,
        stage=stage,
        recipe_text=recipe_yaml(remote),
        backend=backend,
        # The recipe's SkyPilot infra means nothing to Modal; only --cloud there is an error.
        infra=flags.cloud or (launch.infra if backend == "skypilot" else None),
        accelerators=accelerators,
        gpu_type=gpu_type,
        gpus_per_node=gpus_per_node,
        nodes=nodes,
        use_spot=launch.use_spot if flags.spot is None else flags.spot,
        disk_size=launch.disk_size,
        network_tier=launch.network_tier,
        bucket=bucket or None,
        volume=launch.volume,
        secrets=tuple(dict.fromkeys(launch.secrets)),
        max_restarts=launch.max_restarts,
        job_name=launch.job_name or _job_name(recipe.name, stage),
        extras=extras,
        warnings=tuple(_local_file_warnings(recipe)),
    )


def recipe_yaml(recipe: Recipe) -> str:
    """The resolved recipe as the YAML file the remote `wft` reads (every default filled,
    so a different wft default remotely cannot change the run)."""
    data = recipe.model_dump(mode="json", by_alias=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _job_name(name: str, stage: str) -> str:
    # Cloud resource names: lower case letters, digits and dashes.
    text = re.sub(r"[^a-z0-9-]+", "-", f"wft-{name}-{stage}".lower()).strip("-")
    return text[:63].rstrip("-")


def _local_file_warnings(recipe: Recipe, synced: Path | None = None) -> list[str]:
    """Data files named by local path exist on this machine only (a relative path under the
    synced source checkout travels with it)."""
    synced = synced or source_checkout()
    specs = [("data", recipe.data)]
    for name in LAUNCH_STAGES[:-1]:
        section_data = getattr(recipe, name).data
        if section_data is not None:
            specs.append((f"{name}.data", section_data))
    warnings = []
    for where, spec in specs:
        for kind, sources in (("sources", spec.sources), ("eval", spec.eval or [])):
            for source in sources:
                for pattern in source.files or []:
                    if "://" in pattern or _travels(pattern, synced):
                        continue
                    warnings.append(
                        f"{where}.{kind}: {pattern} is a local file; the remote machine will "
                        "not have it (put it in a bucket, or use a hub data set)")
    return warnings


def _travels(pattern: str, synced: Path | None) -> bool:
    # The synced checkout becomes the remote working directory, so a relative path travels
    # when it is read from the checkout's root here too and stays inside it.
    if synced is None or Path(pattern).expanduser().is_absolute():
        return False
    try:
        return Path.cwd().resolve() == synced and (synced / pattern).resolve().is_relative_to(
            synced)
    except OSError:
        return False


def source_checkout() -> Path | None:
    """The wft source checkout this wftool runs from (its root holds pyproject.toml of
    project `wftool`), or None for an installed wheel."""
    root = Path(__file__).resolve().parents[2]
    try:
        text = (root / "pyproject.toml").read_text()
    except OSError:
        return None
    # A regex, not tomllib: Python 3.10 is supported and has none.
    return root if re.search(r'^name\s*=\s*"wftool"\s*$', text, re.MULTILINE) else None


# fsspec protocols of `sync_to` / a stage's `init` -> the wftool extra that installs them.
_STORAGE_EXTRAS = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}


def _storage_extras(recipe: Recipe) -> tuple[str, ...]:
    """Extras for the remote storage a recipe reads or writes (sync_to, stages' init)."""
    urls = [recipe.sync_to] + [getattr(recipe, stage.name).init for stage in TRAINING_STAGES]
    protocols = [str(url).split("://", 1)[0].lower() for url in urls if url and "://" in str(url)]
    return tuple(dict.fromkeys(_STORAGE_EXTRAS[p] for p in protocols if p in _STORAGE_EXTRAS))


def pip_install_command(extras: tuple[str, ...], checkout: bool) -> str:
    """The remote install of wft: the synced checkout (editable), else this exact version
    from PyPI. No CPU constraints file: GPU machines want PyPI's CUDA torch."""
    from wftool import __version__

    spec = f"[{','.join(extras)}]" if extras else ""
    if checkout:
        return f'pip install -e ".{spec}"' if spec else "pip install -e ."
    return f'pip install "wftool{spec}=={__version__}"'
