r"""wft on Modal: one function, `train`, runs a recipe's stage (or its whole pipeline) on Modal
GPUs, with every checkpoint, final/ and the Hugging Face cache on a Volume, so a retried or
relaunched run resumes where the last one stopped.

    modal run modal_apps/wft_app.py --recipe tiny --stage pipeline      # waits for the summary
    WFT_MODAL_GPU=H100:8 modal run --detach modal_apps/wft_app.py \
        --recipe recipes/qwen3_4b.yaml --stage pretrain --spawn         # returns at once
    wft launch qwen3_4b --stage pretrain --backend modal --gpus H100:8  # what wft sends

Modal evaluates decorators at import, so the machine shape comes from WFT_MODAL_* variables
(`wft launch` sets them from the recipe's `launch` section; see wftool/launch/modal_backend.py).
Unset, the app imports as one H100, Volume `wft-runs`, no secrets. Importing needs no Modal
token; `train.local(...)` runs the body on this machine (WFT_MODAL_ROOT moves the Volume's
directory for that).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import modal

from wftool.launch.modal_backend import ENV_KEYS, config_from_env, stage_command
from wftool.launch.plan import REMOTE_RUNS_DIR, source_checkout

CONFIG = config_from_env(os.environ)
COMMIT_EVERY_S = 600  # a container lost mid-run loses at most this much of the Volume's writes


def _image(extras: tuple[str, ...]) -> modal.Image:
    image = modal.Image.debian_slim(python_version="3.11").env({
        "HF_HOME": f"{REMOTE_RUNS_DIR}/hf-cache",  # downloads survive the container
        "PYTHONUNBUFFERED": "1",  # progress reaches `modal app logs` as it happens
    })
    checkout = source_checkout()
    if checkout is None:  # an installed wftool (or this module inside the container)
        from importlib.metadata import PackageNotFoundError, version

        try:
            pin = f"=={version('wftool')}"
        except PackageNotFoundError:
            pin = ""
        spec = f"[{','.join(extras)}]" if extras else ""
        return image.pip_install(f"wftool{spec}{pin}")
    # Dependencies first (a cached layer), then this checkout's sources: an edit to wftool
    # rebuilds only the cheap `--no-deps` install.
    return (
        image.pip_install_from_pyproject(str(checkout / "pyproject.toml"), list(extras))
        .add_local_file(checkout / "pyproject.toml", "/root/wft/pyproject.toml", copy=True)
        .add_local_file(checkout / "README.md", "/root/wft/README.md", copy=True)
        .add_local_dir(checkout / "recipes", "/root/wft/recipes", copy=True)
        .add_local_dir(checkout / "wftool", "/root/wft/wftool", copy=True,
                       ignore=["**/__pycache__", "**/*.pyc"])
        .run_commands("pip install --no-deps /root/wft")
    )


def _secrets() -> list[modal.Secret]:
    # The WFT_MODAL_* settings travel too, so the container's import builds the same CONFIG.
    settings = {key: os.environ[key] for key in ENV_KEYS if key in os.environ}
    return [modal.Secret.from_name(name) for name in CONFIG.secrets] + [
        modal.Secret.from_dict(settings)]


def _on_nodes(nodes: int):
    """Several nodes: one container per node, scheduled together, with an RDMA network."""
    if nodes == 1:
        return lambda function: function
    return modal.clustered(size=nodes, rdma=True)


app = modal.App(CONFIG.app_name)
volume = modal.Volume.from_name(CONFIG.volume, create_if_missing=True)


@app.function(
    image=_image(CONFIG.extras),
    gpu=CONFIG.gpu,
    volumes={REMOTE_RUNS_DIR: volume},
    secrets=_secrets(),
    # A failed attempt restarts the function; the stage resumes from its last checkpoint.
    retries=modal.Retries(max_retries=CONFIG.retries, initial_delay=10.0),
    timeout=CONFIG.timeout,
)
@_on_nodes(CONFIG.nodes)
def train(recipe_text: str, stage: str, overrides: list[str] | None = None) -> dict:
    """Run `stage` (a training stage, or `pipeline`) of the recipe in `recipe_text` with its
    outputs on the Volume; returns a summary (stage, steps, eval numbers, final_dir)."""
    root = os.environ.get("WFT_MODAL_ROOT", REMOTE_RUNS_DIR)
    on_modal = not modal.is_local()
    if on_modal:
        volume.reload()  # see what an earlier attempt committed: resume, not restart
    overrides = [*(overrides or []), f"output_dir={root}"]
    with tempfile.TemporaryDirectory(prefix="wft-") as tmp:
        recipe_path = Path(tmp) / "recipe.yaml"
        recipe_path.write_text(recipe_text)
        with _committing(volume if on_modal else None):
            return _run_stage(str(recipe_path), stage, overrides)


@app.local_entrypoint()
def main(recipe: str, stage: str = "pipeline", overrides: str = "", spawn: bool = False):
    """RECIPE: a file or a bundled recipe name; OVERRIDES: space-separated key=value."""
    from wftool.recipe.load import resolve_recipe_path

    args = (resolve_recipe_path(recipe).read_text(), stage, overrides.split())
    if spawn:  # only with `modal run --detach`: otherwise the app stops when this returns
        call = train.spawn(*args)
        print(f"WFT_MODAL_JOB {app.app_id} {call.object_id}")  # read by `wft launch`
    else:
        print(train.remote(*args))


def _run_stage(recipe_path: str, stage: str, overrides: list[str]) -> dict:
    import torch
    from rich.console import Console

    from wftool.errors import WftError

    gpus = torch.cuda.device_count()
    console = Console()
    try:
        if stage != "pipeline" and (gpus > 1 or CONFIG.nodes > 1):
            return _run_processes(recipe_path, stage, overrides, gpus)
        return _run_in_process(recipe_path, stage, overrides, console)
    except WftError as err:
        # A user error fails the same way on every retry: end the run with it instead.
        console.print(f"[red]error:[/] {err}")
        return {"stage": stage, "error": str(err)}


def _run_in_process(recipe_path: str, stage: str, overrides: list[str], console) -> dict:
    """One process (one GPU, or the CPU in `.local()`): wft's Python API, as `wft <stage>`."""
    from wftool.recipe.load import load_recipe
    from wftool.stage_registry import STUDENT_STAGE_NAMES, final_dir, get_stage

    if stage == "pipeline":
        from wftool.commands.pipeline import run_pipeline

        recipe = load_recipe(recipe_path, overrides)
        rows = run_pipeline(recipe, console)
        last = [s for s in recipe.stages if s in STUDENT_STAGE_NAMES][-1]
        return {"stage": stage, "rows": rows, "final_dir": str(final_dir(recipe, last))}
    recipe = load_recipe(recipe_path, overrides, stage=stage)
    result = get_stage(stage).run_function()(recipe, console)
    return {"stage": stage, "steps": result.steps, "eval": result.eval,
            "final_dir": str(result.final_dir)}


def _run_processes(recipe_path: str, stage: str, overrides: list[str], gpus: int) -> dict:
    """Several GPUs or nodes: `wft <stage> --nproc-per-node N` (torchrun) in this container,
    the node flags from Modal's cluster (rank 0's address is the rendezvous)."""
    from wftool.errors import WftError
    from wftool.recipe.load import load_recipe
    from wftool.stage_registry import final_dir
    from wftool.train.metrics import read_metrics

    nodes, rank, master = 1, 0, None
    if CONFIG.nodes > 1:
        cluster = modal.Cluster.from_context()
        ips = cluster.container_ips()
        nodes, rank, master = len(ips), cluster.container_rank(), ips[0]
    command = stage_command(stage, recipe_path, overrides, max(gpus, 1), nodes, rank, master)
    code = subprocess.run(command).returncode
    if code == 2:  # wft's exit code for a user error; it was printed above
        raise WftError(f"wft {stage} stopped on a user error (exit 2)")
    if code != 0:  # raising makes Modal retry; the stage resumes from its last checkpoint
        raise RuntimeError(f"wft {stage} exited with code {code}")
    # The numbers TrainResult holds in one process, read from what the stage wrote.
    final = final_dir(load_recipe(recipe_path, overrides, stage=stage), stage)
    log, evals = final.parent / "metrics.jsonl", final / "eval.json"
    steps = [r["step"] for r in read_metrics(log) if "step" in r] if log.is_file() else []
    return {"stage": stage, "steps": steps[-1] if steps else None,
            "eval": json.loads(evals.read_text()) if evals.is_file() else {},
            "final_dir": str(final), "processes": nodes * max(gpus, 1)}


@contextmanager
def _committing(vol: modal.Volume | None):
    """Commit the Volume every COMMIT_EVERY_S while the stage runs, and at the end, so the
    checkpoints a lost container saved reach the retry (wft has no per-checkpoint hook)."""
    if vol is None:
        yield
        return
    stop = threading.Event()

    def commit():
        try:
            vol.commit()
        except Exception as err:  # a failed commit must not end a run that is training
            print(f"warning: Volume commit failed: {err}")

    def loop():
        while not stop.wait(COMMIT_EVERY_S):
            commit()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        commit()
