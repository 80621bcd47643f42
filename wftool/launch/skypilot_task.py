"""The SkyPilot backend: a LaunchPlan -> a SkyPilot task config (a pure function, no `import
sky`), submitted as a managed job that SkyPilot restarts after a preemption or a failure; wft
then resumes from the last checkpoint in the mounted bucket.

SkyPilot lives in its own environment, as a tool (`uv tool install skypilot`): 0.14 pins
click<8.2 while the hub client transformers 5 needs pins click>=8.4.2, so the two cannot share
one. wft drives its `sky` CLI (`sky jobs launch|queue|logs|cancel`) and checks tasks with its
own parser by running that environment's Python.

Secrets travel by name: the task lists `HF_TOKEN: null` and `sky jobs launch --secret HF_TOKEN`
reads the value from the environment it inherits; wft never reads, writes or prints a value."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from wftool.errors import WftError
from wftool.launch.plan import REMOTE_RECIPE_PATH, LaunchPlan, pip_install_command

# MOUNT_CACHED: checkpoints are written to local disk and uploaded in the background, so a
# save does not wait on the bucket (SkyPilot's recommended mode for training checkpoints).
_BUCKET_MODE = "MOUNT_CACHED"
SKY_INSTALL_HINT = ('uv tool install "skypilot[nebius,runpod]" (or pipx install skypilot), '
                    "then `sky check`; or point WFT_SKY at a `sky` executable")
# The project's SkyPilot environment in a source checkout (`make test` builds it).
_CHECKOUT_SKY_VENV = Path(__file__).resolve().parents[2] / ".venv-sky"
# Secrets a run can do without when the recipe does not use them.
_OPTIONAL_SECRETS = {"WANDB_API_KEY": lambda plan: not plan.recipe.logging.wandb}
# Run by SkyPilot's own Python: the task on stdin through SkyPilot's parser, the error on
# stderr and exit 1 when it rejects it (exit 3: this Python has no SkyPilot).
_VALIDATE = """\
import sys, yaml
try:
    import sky
except ImportError:
    sys.exit(3)
try:
    sky.Task.from_yaml_config(yaml.safe_load(sys.stdin))
except Exception as err:
    sys.stderr.write(f"{type(err).__name__}: {err}\\n")
    sys.exit(1)
"""
_JOB_ID = re.compile(r"Managed Job ID: (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# -- the task (pure) --------------------------------------------------------------------------


def task_config(plan: LaunchPlan, recipe_file: str, workdir: str | None,
                secrets: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The SkyPilot task (YAML form) for a plan: `recipe_file` is the local resolved recipe
    mounted at ~/wft-recipe.yaml; `workdir` is a wft source checkout to sync and install, or
    None to install this wft version from PyPI; `secrets` the names to list (default: the
    plan's, less those the recipe does not use)."""
    resources: dict[str, Any] = {}
    if plan.infra:
        resources["infra"] = plan.infra
    resources["accelerators"] = f"{plan.gpu_type}:{plan.gpus_per_node}"
    resources["use_spot"] = plan.use_spot
    resources["disk_size"] = plan.disk_size
    if plan.network_tier:
        resources["network_tier"] = plan.network_tier
    # Preemptions always restart a managed job; this bounds restarts after other failures.
    resources["job_recovery"] = {"max_restarts_on_errors": plan.max_restarts}

    config: dict[str, Any] = {"name": plan.job_name, "num_nodes": plan.nodes,
                              "resources": resources}
    if workdir:
        config["workdir"] = workdir
    mounts: dict[str, Any] = {REMOTE_RECIPE_PATH: recipe_file}
    if plan.bucket:
        mounts[plan.output_dir] = {"source": plan.bucket, "mode": _BUCKET_MODE}
    config["file_mounts"] = mounts
    names = needed_secrets(plan) if secrets is None else secrets
    if names:
        config["secrets"] = {name: None for name in names}  # names only, never values
    config["setup"] = setup_script(plan, checkout=workdir is not None)
    config["run"] = run_script(plan)
    return config


def setup_script(plan: LaunchPlan, checkout: bool) -> str:
    """Runs once per node before `run` (SkyPilot runs it in the synced workdir)."""
    return "set -euo pipefail\n" + pip_install_command(plan.extras, checkout) + "\n"


def run_script(plan: LaunchPlan) -> str:
    """The job itself, on every node. The `wft` command is the last line, so a test can
    append ` --dry-run` and run the script with SKYPILOT_* set to see the torchrun command."""
    args = f"wft {plan.stage} {REMOTE_RECIPE_PATH}"  # unquoted: the shell expands its ~
    lines = ["set -euo pipefail"]
    if plan.stage == "pipeline":
        lines.append(args)  # one process: `wft pipeline` takes no torchrun flags
    else:
        lines += [
            '# torchrun rendezvous: the first node listed is the master',
            'MASTER_ADDR=$(echo "$SKYPILOT_NODE_IPS" | head -n1)',
            f'{args} --nproc-per-node "$SKYPILOT_NUM_GPUS_PER_NODE" '
            '--nnodes "$SKYPILOT_NUM_NODES" --node-rank "$SKYPILOT_NODE_RANK" '
            '--master-addr "$MASTER_ADDR"',
        ]
    return "\n".join(lines) + "\n"


def task_yaml(plan: LaunchPlan, config: dict[str, Any]) -> str:
    """The task as a commented YAML file that `sky jobs launch FILE` also accepts."""
    secrets = "".join(f"--secret {name} " for name in config.get("secrets", {}))
    header = (
        f"# SkyPilot task: `wft {plan.stage}` of recipe {plan.recipe.name}, written by "
        "`wft launch`.\n"
        f"# Submit it yourself: sky jobs launch {secrets}THIS_FILE\n"
        "# Secrets are listed by name; their values come from your environment at "
        "submission.\n")
    return header + yaml.dump(config, Dumper=_BlockDumper, sort_keys=False,
                              allow_unicode=True, width=100)


def launch_argv(plan: LaunchPlan, task_file: str, secrets: tuple[str, ...],
                sky: str = "sky") -> list[str]:
    """`sky jobs launch` for a written task: no prompt (wft asked), detached (wft prints
    the logs command), each secret by name (sky reads its value from the environment)."""
    argv = [sky, "jobs", "launch", "--yes", "--detach-run", "--name", plan.job_name]
    for name in secrets:
        argv += ["--secret", name]
    return argv + [task_file]


def needed_secrets(plan: LaunchPlan) -> tuple[str, ...]:
    """The plan's secrets less those its recipe does not use (a W&B key without W&B)."""
    return tuple(name for name in plan.secrets
                 if not (name in _OPTIONAL_SECRETS and _OPTIONAL_SECRETS[name](plan)))


def passed_secrets(plan: LaunchPlan, environ: Mapping[str, str] = os.environ
                   ) -> tuple[tuple[str, ...], list[str]]:
    """The plan's secrets set in `environ` (names), and a warning per optional secret left
    out. A required secret missing is an error naming it. Values are only tested, not kept."""
    names, warnings = [], []
    for name in plan.secrets:
        if environ.get(name):
            names.append(name)
        elif name in _OPTIONAL_SECRETS and _OPTIONAL_SECRETS[name](plan):
            warnings.append(f"{name} is not set; not passed (logging.wandb is off)")
        else:
            raise WftError(
                f"secret {name} is not set in this environment (launch.secrets lists it)",
                f"export {name}=... before `wft launch`, or leave it out: "
                f"launch.secrets='[{', '.join(s for s in plan.secrets if s != name)}]'")
    return tuple(names), warnings


# -- SkyPilot's environment -------------------------------------------------------------------


def find_sky_cli() -> str | None:
    """The `sky` executable: $WFT_SKY, else `sky` on PATH, else the checkout's .venv-sky."""
    if os.environ.get("WFT_SKY"):
        return _named_file("WFT_SKY")
    found = shutil.which("sky")
    if found:
        return found
    beside = _CHECKOUT_SKY_VENV / "bin" / "sky"
    return str(beside) if beside.is_file() else None


def find_sky_python() -> str | None:
    """The Python of SkyPilot's environment: $WFT_SKY_PYTHON, else the `python` beside the
    `sky` script (a tool's PATH entry is a link into its environment), else .venv-sky's."""
    if os.environ.get("WFT_SKY_PYTHON"):
        return _named_file("WFT_SKY_PYTHON")
    sky = find_sky_cli()
    dirs = [Path(sky).parent, Path(sky).resolve().parent] if sky else []
    dirs.append(_CHECKOUT_SKY_VENV / "bin")
    for folder in dirs:
        for name in ("python", "python3"):
            if (folder / name).is_file():
                return str(folder / name)
    return None


def sky_cli() -> str:
    """`find_sky_cli()`, or an error saying how to install SkyPilot."""
    return find_sky_cli() or _not_installed()


def sky_python() -> str:
    """`find_sky_python()`, or an error saying how to install SkyPilot."""
    return find_sky_python() or _not_installed()


def sky_version(sky: str) -> str | None:
    """SkyPilot's version in the environment of a `sky` script, without running it."""
    import importlib.metadata

    env = Path(sky).resolve().parent.parent
    paths = [str(p) for p in env.glob("lib/python3*/site-packages")]
    found = next(iter(importlib.metadata.distributions(name="skypilot", path=paths)), None)
    return found.version if found else None


def _named_file(variable: str) -> str:
    path = os.environ[variable]
    if not Path(path).is_file():
        raise WftError(f"{variable}={path} is not a file",
                       f"unset {variable}, or point it at SkyPilot's "
                       f"{'Python' if variable.endswith('PYTHON') else '`sky` executable'}")
    return path


def _not_installed():
    raise WftError("SkyPilot is not installed: wft needs its `sky` command (SkyPilot is "
                   "installed as its own tool: its click pin conflicts with the one of the "
                   "Hugging Face hub client transformers needs)", SKY_INSTALL_HINT)


# -- checking, submitting, following ----------------------------------------------------------


def validate(config: dict[str, Any]) -> bool:
    """Check the task with SkyPilot's own parser, offline, in SkyPilot's environment: True
    when it accepts it, False when no SkyPilot is installed (nothing checked); a WftError
    with SkyPilot's message when it rejects it."""
    python = find_sky_python()
    if python is None:
        return False
    result = subprocess.run([python, "-c", _VALIDATE], input=yaml.safe_dump(config),
                            capture_output=True, text=True)
    if result.returncode == 3:
        raise WftError(f"{python} cannot import sky", "set WFT_SKY_PYTHON to the Python of "
                       f"SkyPilot's environment, or {SKY_INSTALL_HINT}")
    if result.returncode:
        message = (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise WftError(f"SkyPilot rejects the task: {message}",
                       "check the recipe's launch section and the flags")
    return True


def submit(plan: LaunchPlan, workdir: str | None, echo: Callable[[str], None]) -> str:
    """Write the task and the resolved recipe to a temporary directory, send them with
    `sky jobs launch` (SkyPilot uploads them before it returns) and return the job id;
    SkyPilot's own output goes to `echo` line by line."""
    sky = sky_cli()
    secrets, warnings = passed_secrets(plan)
    for warning in warnings:
        echo(f"warning: {warning}")
    with tempfile.TemporaryDirectory(prefix="wft-launch-") as tmp:
        recipe_file = Path(tmp) / "wft-recipe.yaml"
        recipe_file.write_text(plan.recipe_text)
        task_file = Path(tmp) / "task.yaml"
        config = task_config(plan, str(recipe_file), workdir, secrets)
        task_file.write_text(task_yaml(plan, config))
        job = None
        with subprocess.Popen(launch_argv(plan, str(task_file), secrets, sky), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
            for line in proc.stdout:
                echo(line.rstrip("\n"))
                match = _JOB_ID.search(_ANSI.sub("", line))
                job = match.group(1) if match else job
    if proc.returncode:
        raise WftError(f"`sky jobs launch` failed (exit {proc.returncode}); its output is "
                       "above", "`sky check` shows which clouds your credentials enable")
    return job or plan.job_name


def status(job: str | None) -> int:
    """`sky jobs queue`, or one job's row of it."""
    if job is None:
        return _sky(["jobs", "queue"])
    result = subprocess.run([sky_cli(), "jobs", "queue", "--all", "--output", "json"],
                            capture_output=True, text=True)
    if result.returncode:
        sys.stderr.write(result.stderr)
        return result.returncode
    rows = [r for r in json.loads(result.stdout or "[]")
            if job in (str(r.get("job_id")), r.get("job_name"))]
    if not rows:
        raise WftError(f"no managed job {job!r}", "`wft launch status` lists them all")
    for row in rows:
        print(f"{row.get('job_id')}  {row.get('job_name')}  {row.get('status')}  "
              f"{row.get('infra') or ''}  {row.get('resources') or ''}  "
              f"recoveries: {row.get('recovery_count') or 0}")
    return 0


def logs(job: str, follow: bool = True) -> int:
    return _sky(["jobs", "logs", "--follow" if follow else "--no-follow", *_job_args(job)])


def down(job: str) -> int:
    # --graceful: the last checkpoints in the MOUNT_CACHED bucket finish uploading first.
    return _sky(["jobs", "cancel", "--yes", "--graceful", *_job_args(job)])


def _job_args(job: str) -> list[str]:
    return [job] if job.isdigit() else ["--name", job]


def _sky(args: list[str]) -> int:
    return subprocess.run([sky_cli(), *args]).returncode


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the setup and run scripts) as readable `|` blocks."""


def _str(dumper, text):
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_BlockDumper.add_representer(str, _str)
