"""`wft launch --backend modal`: a LaunchPlan becomes one detached `modal run` of
`modal_apps/wft_app.py`, and `wft launch status|logs|down` wrap `modal app list|logs|stop`.

Modal reads a function's GPU, volume, secrets and retries from decorators, evaluated when the
app module is imported. So the plan travels as `WFT_MODAL_*` environment variables
(`plan_env`), and the app module reads them back (`config_from_env`) on both sides: here,
when `modal run` imports it, and in the container. Everything up to `submit`'s subprocess is
pure: no network, no Modal import, so tests and `--dry-run` check it offline.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from wftool.errors import WftError
from wftool.launch.plan import LaunchPlan, source_checkout

# The gpu= strings Modal accepts (modal.com/docs/guide/gpu; Modal upper-cases them).
# `H100!` pins a true H100 (no upgrade to H200); `B200+` may get a B300.
MODAL_GPUS = ("T4", "L4", "A10", "A10G", "L40S", "A100", "A100-40GB", "A100-80GB",
              "RTX-PRO-6000", "H100", "H100!", "H200", "B200", "B200+")
_MAX_GPUS = {"A10": 4, "A10G": 4}  # every other type: up to 8 per container
MAX_GPUS_PER_CONTAINER = 8
# Modal clusters (`modal.clustered`): each container takes all 8 GPUs of its host, at most
# 32 nodes, on the types with an RDMA network.
CLUSTER_GPUS = ("H100", "H100!", "H200", "B200", "B200+")
MAX_NODES = 32
MAX_RETRIES = 10  # Modal's largest retry count
DAY_SECONDS = 24 * 60 * 60  # Modal's longest function timeout; a retry gets a fresh one
_SECRET_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
APP_MODULE = Path("modal_apps") / "wft_app.py"
_JOB_LINE = re.compile(r"^WFT_MODAL_JOB (ap-[A-Za-z0-9]+) (fc-[A-Za-z0-9]+)$")
_APP_ID = re.compile(r"^ap-[A-Za-z0-9]{22}$")


# What `plan_env` sets and `config_from_env` reads (WFT_MODAL_TIMEOUT: seconds, for direct
# `modal run`s; WFT_MODAL_ROOT, for `.local()` runs, is not part of the machine's shape).
ENV_KEYS = ("WFT_MODAL_APP", "WFT_MODAL_GPU", "WFT_MODAL_NODES", "WFT_MODAL_VOLUME",
            "WFT_MODAL_SECRETS", "WFT_MODAL_RETRIES", "WFT_MODAL_TIMEOUT", "WFT_MODAL_EXTRAS")


@dataclass(frozen=True)
class ModalConfig:
    """What the app module's decorators take. The defaults import cleanly with no plan."""

    app_name: str = "wft"
    gpu: str = "H100"  # Modal's gpu= string, TYPE[:COUNT]
    nodes: int = 1
    volume: str = "wft-runs"
    secrets: tuple[str, ...] = ()  # Modal Secret names
    retries: int = 3
    timeout: int = DAY_SECONDS
    extras: tuple[str, ...] = ()  # wftool extras installed in the image, e.g. ("wandb",)


def check_gpus(gpus: str, nodes: int = 1) -> tuple[str, int]:
    """`H100:8` -> ("H100", 8), or a WftError saying what Modal would refuse."""
    gpu_type, _, count_text = gpus.strip().partition(":")
    name = gpu_type.upper()
    if name not in MODAL_GPUS:
        close = difflib.get_close_matches(name, MODAL_GPUS, n=1, cutoff=0.5)
        hint = ((f"did you mean {close[0]}? " if close else "")
                + f"Modal GPUs: {', '.join(MODAL_GPUS)}")
        raise WftError(f"--gpus {gpus!r}: Modal has no GPU type {gpu_type!r}", hint)
    if count_text and not count_text.isdigit():
        raise WftError(f"--gpus {gpus!r}: the count must be a whole number", "e.g. --gpus H100:8")
    count = int(count_text or 1)
    most = _MAX_GPUS.get(name, MAX_GPUS_PER_CONTAINER)
    if not 1 <= count <= most:
        raise WftError(f"--gpus {gpus!r}: Modal gives 1 to {most} {name} GPUs per container",
                       f"use --gpus {name}:{most} and --nodes for more")
    if not 1 <= nodes <= MAX_NODES:
        raise WftError(f"--nodes {nodes}: Modal clusters have 1 to {MAX_NODES} nodes")
    if nodes > 1 and (name not in CLUSTER_GPUS or count != MAX_GPUS_PER_CONTAINER):
        raise WftError(
            f"--nodes {nodes} with --gpus {gpus}: a Modal cluster's containers each take all 8 "
            "GPUs of an H100, H200 or B200 node",
            "use --gpus H100:8 (or H200:8, B200:8) with --nodes, or --nodes 1")
    return name, count


def modal_secrets(plan: LaunchPlan) -> tuple[str, ...]:
    """The Modal Secrets the run attaches: a W&B key only when the recipe logs to W&B
    (each listed Secret must exist on Modal, or the run does not start)."""
    return tuple(name for name in plan.secrets
                 if plan.recipe.logging.wandb or name != "WANDB_API_KEY")


def check_modal_plan(plan: LaunchPlan) -> list[str]:
    """Raise WftError for what Modal would refuse; return the checks that passed, one line
    each (what `--dry-run` prints)."""
    name, count = check_gpus(plan.accelerators, plan.nodes)
    if plan.nodes > 1:
        raise WftError(
            f"--nodes {plan.nodes} on Modal: the containers of a cluster each see the Volume "
            "as of their last reload, so it is not one checkpoint directory for all of them, "
            "which wft's sharded checkpoints need",
            "use one container with up to 8 GPUs (--gpus H100:8 --nodes 1), or several nodes "
            "through SkyPilot with output_dir on a shared file system")
    if plan.max_restarts > MAX_RETRIES:
        raise WftError(f"launch.max_restarts={plan.max_restarts}: Modal retries a function at "
                       f"most {MAX_RETRIES} times", f"set launch.max_restarts={MAX_RETRIES}")
    for secret in modal_secrets(plan):
        if not _SECRET_NAME.match(secret):
            raise WftError(f"launch.secrets: {secret!r} is not a Modal Secret name",
                           "letters, digits, '.', '_' and '-', at most 64")
    shape = f"{plan.nodes} x {name}:{count}" + (" (modal.clustered)" if plan.nodes > 1 else "")
    return [f"modal: {shape}, {plan.world_size} process(es)",
            f"modal: Volume {plan.volume} at {plan.output_dir} (checkpoints, HF cache)",
            f"modal: secrets {', '.join(modal_secrets(plan)) or 'none'}; "
            f"{plan.max_restarts} retries, each resuming"]


def plan_env(plan: LaunchPlan) -> dict[str, str]:
    """The WFT_MODAL_* variables the app module's decorators read."""
    return {
        "WFT_MODAL_APP": plan.job_name,
        "WFT_MODAL_GPU": f"{plan.gpu_type.upper()}:{plan.gpus_per_node}",
        "WFT_MODAL_NODES": str(plan.nodes),
        "WFT_MODAL_VOLUME": plan.volume,
        "WFT_MODAL_SECRETS": ",".join(modal_secrets(plan)),
        "WFT_MODAL_RETRIES": str(plan.max_restarts),
        "WFT_MODAL_EXTRAS": ",".join(plan.extras),
    }


def config_from_env(env: Mapping[str, str]) -> ModalConfig:
    """The app's decorator arguments from WFT_MODAL_* (unset: ModalConfig's defaults)."""
    default = ModalConfig()

    def number(key: str, fallback: int) -> int:
        text = env.get(key, "").strip()
        if text and not text.isdigit():
            raise WftError(f"{key}={text!r} is not a whole number")
        return int(text) if text else fallback

    def names(key: str) -> tuple[str, ...]:
        return tuple(n.strip() for n in env.get(key, "").split(",") if n.strip())

    nodes = number("WFT_MODAL_NODES", default.nodes)
    gpu_type, count = check_gpus(env.get("WFT_MODAL_GPU") or default.gpu, nodes)
    return ModalConfig(
        app_name=env.get("WFT_MODAL_APP") or default.app_name,
        gpu=f"{gpu_type}:{count}",
        nodes=nodes,
        volume=env.get("WFT_MODAL_VOLUME") or default.volume,
        secrets=names("WFT_MODAL_SECRETS"),
        retries=min(number("WFT_MODAL_RETRIES", default.retries), MAX_RETRIES),
        timeout=number("WFT_MODAL_TIMEOUT", default.timeout),
        extras=names("WFT_MODAL_EXTRAS"),
    )


def stage_command(stage: str, recipe_path: str, overrides: list[str], nproc_per_node: int,
                  nnodes: int = 1, node_rank: int = 0, master_addr: str | None = None
                  ) -> list[str]:
    """`wft <stage> RECIPE ... --nproc-per-node N` (and the node flags on a cluster): how a
    container with several GPUs runs a stage, one process per GPU."""
    command = [sys.executable, "-m", "wftool", stage, recipe_path, *overrides,
               "--nproc-per-node", str(nproc_per_node)]
    if nnodes > 1:
        command += ["--nnodes", str(nnodes), "--node-rank", str(node_rank),
                    "--master-addr", str(master_addr)]
    return command


def submit(plan: LaunchPlan, echo=print) -> str:
    """Send the plan as a detached Modal app; returns its app id (`ap-...`)."""
    check_modal_plan(plan)
    _require_modal()
    _require_token(os.environ)
    app_file = _app_module()
    with tempfile.TemporaryDirectory(prefix="wft-modal-") as tmp:
        recipe_file = Path(tmp) / "recipe.yaml"
        recipe_file.write_text(plan.recipe_text)
        # `--detach` keeps the app alive after this client exits; `--spawn` makes the
        # entrypoint return at once instead of waiting hours for the run.
        command = [sys.executable, "-m", "modal", "run", "--detach", f"{app_file}::main",
                   "--recipe", str(recipe_file), "--stage", plan.stage, "--spawn"]
        app_id, call_id, output = _run_streaming(command, {**os.environ, **plan_env(plan)}, echo)
    if app_id is None:
        raise WftError("modal run did not start the job", _failure_hint(output))
    echo(f"submitted {plan.job_name}: Modal app {app_id}, function call {call_id}")
    echo(f"  follow:  wft launch logs {app_id} --follow")
    echo(f"  status:  wft launch status {app_id}")
    echo(f"  stop:    wft launch down {app_id}")
    echo(f"  outputs: modal volume ls {plan.volume} {plan.recipe.name}")
    return app_id


def status(job: str | None = None) -> int:
    """`modal app list`, narrowed to one job (app id or job name) when given."""
    if job is None:
        return _modal(["app", "list"])
    rows = [r for r in _app_rows() if job in (r.get("app_id"), r.get("description"))]
    if not rows:
        print(f"no Modal app {job!r} (`wft launch status` lists them all)")
        return 1
    for row in rows:
        print(f"{row['app_id']}  {row['description']}  {row['state']}  tasks {row['tasks']}  "
              f"created {row['created_at']}" + (f"  stopped {row['stopped_at']}"
                                                if row.get("stopped_at") else ""))
    return 0


def logs(job: str, follow: bool = False) -> int:
    """`modal app logs APP_ID [--follow]`."""
    return _modal(["app", "logs", _app_id(job), *(["--follow"] if follow else [])])


def down(job: str) -> int:
    """`modal app stop APP_ID`: ends the run; the Volume keeps its checkpoints."""
    return _modal(["app", "stop", _app_id(job), "--yes"])


def _require_modal() -> None:
    try:
        import modal  # noqa: F401
    except ImportError:
        raise WftError("--backend modal needs the `modal` package",
                       "pip install 'wftool[cloud]'") from None


def _require_token(env: Mapping[str, str]) -> None:
    """A clear message before `modal` prints a traceback about missing credentials."""
    if env.get("MODAL_TOKEN_ID") and env.get("MODAL_TOKEN_SECRET"):
        return
    config = Path(env.get("MODAL_CONFIG_PATH") or Path.home() / ".modal.toml")
    try:
        if "token_id" in config.read_text():
            return
    except OSError:
        pass
    raise WftError(f"no Modal token: MODAL_TOKEN_ID/MODAL_TOKEN_SECRET are unset and {config} "
                   "holds none", "run `modal token new` (opens a browser), then retry")


def _app_module() -> Path:
    checkout = source_checkout()
    if checkout is None or not (checkout / APP_MODULE).is_file():
        raise WftError(f"--backend modal runs {APP_MODULE} from a wft source checkout, and "
                       "this wftool is an installed package",
                       "git clone the wft repository and `pip install -e '.[cloud]'` there")
    return checkout / APP_MODULE


def _run_streaming(command: list[str], env: dict, echo) -> tuple[str | None, str | None, str]:
    """Run `modal run`, echoing its output, and pick the ids its entrypoint prints."""
    app_id = call_id = None
    lines = []
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as process:
        for line in process.stdout:
            lines.append(line)
            match = _JOB_LINE.match(line.strip())
            if match:
                app_id, call_id = match.groups()
            else:
                echo(line.rstrip("\n"))
    if process.returncode != 0:
        app_id = None
    return app_id, call_id, "".join(lines)


def _failure_hint(output: str) -> str:
    secret = re.search(r"Secret '([^']+)' not found", output) or re.search(
        r"[Ss]ecret.*?'([^']+)'.*not found", output)
    if secret:
        name = secret.group(1)
        return (f"create it: modal secret create {name} {name}=... (or drop it: "
                f"launch.secrets='[...]' without {name})")
    if "secret" in output.lower():
        return ("a Secret in launch.secrets may be missing (`modal secret list`); create it "
                "with `modal secret create NAME NAME=...`")
    return "see Modal's message above; `modal token new` if it is about credentials"


def _modal(args: list[str]) -> int:
    _require_modal()
    _require_token(os.environ)
    return subprocess.call([sys.executable, "-m", "modal", *args])


def _app_rows() -> list[dict]:
    _require_modal()
    _require_token(os.environ)
    done = subprocess.run([sys.executable, "-m", "modal", "app", "list", "--json"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise WftError(f"modal app list failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout or "[]")


def _app_id(job: str) -> str:
    """An app id as given, or the newest app whose name (the job name) is `job`: ephemeral
    apps such as `modal run --detach` ones are found by id only."""
    if _APP_ID.match(job):
        return job
    rows = [r for r in _app_rows() if r.get("description") == job]
    if not rows:
        raise WftError(f"no Modal app named {job!r}", "`wft launch status` lists the apps")
    return max(rows, key=lambda r: r.get("created_at") or "")["app_id"]
