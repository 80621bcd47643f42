"""`wft launch`: a recipe's stage on a SkyPilot cloud or Modal, plus `wft launch
status|logs|down` for the jobs it started. The command only wires flags to wftool.launch:
plan (flags + recipe), rules (checked before any network call), then a backend."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from wftool.errors import WftError

ACTIONS = ("status", "logs", "down")
_DRY_RUN_RECIPE = "<the resolved recipe, written when submitted (--emit-yaml writes it)>"


def register(app: typer.Typer) -> None:
    """Add `wft launch` to the wft app (called by wftool.cli)."""
    from wftool.cli import _examples, user_errors

    @app.command("launch", epilog=_examples(
        "wft launch qwen3_4b --stage pretrain --cloud nebius --gpus H100:8 --nodes 2  "
        "# add --bucket s3://my-bucket/wft to resume after a preemption",
        "wft launch smollm2_135m --stage pipeline --cloud runpod --gpus H100:1",
        "wft launch tiny --stage pretrain --gpus L4 --dry-run  # print the task, send nothing",
        "wft launch tiny --stage pretrain --emit-yaml task.yaml  # for `sky jobs launch`",
        "wft launch status  # every job; `wft launch status 12` one",
        "wft launch logs 12 --no-follow",
        "wft launch down 12",
    ))
    @user_errors
    def launch(
        recipe: Annotated[str, typer.Argument(
            help="Recipe YAML file or bundled name; or status, logs, down (jobs).")],
        overrides: Annotated[Optional[list[str]], typer.Argument(
            help="Dotted overrides (resolved in --stage's section), e.g. "
            "training.max_steps=100; after status/logs/down: the job id or name.")] = None,
        stage: Annotated[Optional[str], typer.Option(
            help="What the job runs: layerwise, pretrain, distill, or pipeline.")] = None,
        cloud: Annotated[Optional[str], typer.Option(
            help="SkyPilot infra: nebius, runpod, aws, gcp, lambda, ..., or aws/us-east-1 "
            "(default: launch.infra; unset: any enabled cloud).")] = None,
        gpus: Annotated[Optional[str], typer.Option(
            help="GPUs per node, TYPE:COUNT, e.g. H100:8 (default: launch.accelerators).")
        ] = None,
        nodes: Annotated[Optional[int], typer.Option(
            min=1, help="Machines (default: launch.nodes).")] = None,
        backend: Annotated[Optional[str], typer.Option(
            help="skypilot or modal (default: launch.backend).")] = None,
        spot: Annotated[Optional[bool], typer.Option(
            "--spot/--no-spot", help="Spot machines; the job resumes after a preemption "
            "(default: launch.use_spot).")] = None,
        bucket: Annotated[Optional[str], typer.Option(
            help="Bucket for checkpoints and outputs, mounted at /wft-runs, e.g. "
            "s3://my-bucket/wft (default: launch.bucket).")] = None,
        dry_run: Annotated[bool, typer.Option(
            "--dry-run", help="Check and print the task; send nothing.")] = False,
        emit_yaml: Annotated[Optional[Path], typer.Option(
            "--emit-yaml", help="Write the SkyPilot task (and the resolved recipe beside it, "
            "FILE.recipe.yaml).")] = None,
        yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before submitting.")
                       ] = False,
        follow: Annotated[bool, typer.Option(
            "--follow/--no-follow", help="logs: keep streaming.")] = True,
    ):
        """Run a recipe's stage on a SkyPilot cloud (Nebius, RunPod, AWS, ...) or Modal, as a
        job that resumes from its last checkpoint after a preemption."""
        from wftool.cli import console, error_console

        if recipe in ACTIONS:
            raise typer.Exit(run_action(recipe, overrides or [], backend, follow))
        launch_recipe(recipe, overrides or [], stage, _flags(cloud, gpus, nodes, backend, spot,
                                                             bucket),
                      dry_run=dry_run, emit_yaml=emit_yaml, yes=yes, console=console,
                      error_console=error_console)


def _flags(cloud, gpus, nodes, backend, spot, bucket):
    from wftool.launch.plan import LaunchFlags

    return LaunchFlags(backend=backend, cloud=cloud, gpus=gpus, nodes=nodes, spot=spot,
                       bucket=bucket)


def launch_recipe(recipe: str, overrides: list[str], stage: str | None, flags, *,
                  dry_run: bool, emit_yaml: Path | None, yes: bool, console,
                  error_console) -> None:
    """Resolve, check, then print / write / submit the task."""
    from wftool.launch.plan import LAUNCH_STAGES, build_plan, source_checkout
    from wftool.launch.rules import check_plan, plan_warnings
    from wftool.recipe.load import load_recipe

    if stage is None:
        raise WftError("wft launch needs --stage", f"stages: {', '.join(LAUNCH_STAGES)}")
    if stage not in LAUNCH_STAGES:
        raise WftError(f"--stage {stage!r} cannot be launched",
                       f"stages: {', '.join(LAUNCH_STAGES)}")
    config = load_recipe(recipe, overrides, stage=None if stage == "pipeline" else stage)
    plan = build_plan(config, stage, flags)
    passed = check_plan(plan)
    if emit_yaml is not None and plan.backend != "skypilot":
        raise WftError("--emit-yaml writes a SkyPilot task", "drop it with --backend modal")
    for warning in plan_warnings(plan):
        error_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    if plan.backend == "modal":
        return _modal(plan, passed, dry_run, yes, console, error_console)

    from wftool.launch import skypilot_task as sp

    workdir = source_checkout()
    workdir_text = str(workdir) if workdir else None
    if dry_run or emit_yaml is not None:
        # Nothing is sent: check the task with SkyPilot's own parser (offline) and show it.
        task = sp.task_config(plan, _DRY_RUN_RECIPE, workdir_text)
        checked = sp.validate(task)  # False: no SkyPilot here to check with
        if checked:
            passed.append("SkyPilot accepts the task (sky.Task.from_yaml_config)")
        passed.append(_secrets_line(plan))
        _print_checks(passed, error_console)
        if not checked:
            error_console.print("[yellow]warning:[/] SkyPilot check skipped: SkyPilot is not "
                                f"installed ({escape(sp.SKY_INSTALL_HINT)})", highlight=False)
        if emit_yaml is not None:
            recipe_file = emit_yaml.with_suffix(".recipe.yaml")
            recipe_file.write_text(plan.recipe_text)
            task = sp.task_config(plan, str(recipe_file.resolve()), workdir_text)
            emit_yaml.write_text(sp.task_yaml(plan, task))
            error_console.print(f"wrote {emit_yaml} and {recipe_file}; submit with "
                                f"`sky jobs launch {_secret_flags(plan)}{emit_yaml}`",
                                highlight=False, markup=False)
        if dry_run:
            console.print(sp.task_yaml(plan, task), highlight=False, markup=False, end="",
                          soft_wrap=True)  # YAML lines must not be wrapped
        return
    sp.sky_cli()  # not installed: say so before asking
    _print_checks(passed, error_console)
    if not yes and not typer.confirm(f"Submit {_what(plan)}?"):
        raise typer.Exit(1)
    job = sp.submit(plan, workdir_text, echo=lambda line: console.print(
        line, highlight=False, markup=False))
    console.print(f"[green]submitted[/] managed job {job} ({plan.job_name})", highlight=False)
    console.print(f"  wft launch logs {job}\n  wft launch status {job}\n  wft launch down {job}",
                  highlight=False, markup=False)


def run_action(action: str, args: list[str], backend: str | None, follow: bool) -> int:
    """`wft launch status [JOB]`, `logs JOB`, `down JOB` on the backend's own tools."""
    if len(args) > 1 or (action != "status" and not args):
        raise WftError(f"usage: wft launch {action} {'[JOB]' if action == 'status' else 'JOB'}",
                       "JOB: the id or name `wft launch status` shows")
    job = args[0] if args else None
    module = _backend_module(backend or "skypilot")
    if action == "status":
        return module.status(job)
    if action == "logs":
        return module.logs(job, follow)
    return module.down(job)


def _backend_module(backend: str):
    if backend == "skypilot":
        from wftool.launch import skypilot_task

        return skypilot_task
    if backend == "modal":
        from wftool.launch import modal_backend

        return modal_backend
    raise WftError(f"--backend {backend!r} is not a launch backend",
                   "use --backend skypilot or --backend modal")


def _modal(plan, passed, dry_run, yes, console, error_console) -> None:
    modal_backend = _backend_module("modal")
    _print_checks(passed + modal_backend.check_modal_plan(plan), error_console)
    if dry_run:
        console.print(f"would run `wft {plan.stage}` of {plan.recipe.name} on Modal: "
                      f"{_what(plan)}, volume {plan.volume}", highlight=False, markup=False)
        return
    if not yes and not typer.confirm(f"Submit {_what(plan)} to Modal?"):
        raise typer.Exit(1)
    modal_backend.submit(plan, echo=lambda line: console.print(line, highlight=False,
                                                               markup=False))


def _what(plan) -> str:
    where = f" on {plan.infra}" if plan.infra else ""
    spot = " spot" if plan.use_spot else ""
    return f"{plan.nodes} x {plan.gpu_type}:{plan.gpus_per_node}{spot}{where}"


def _secret_flags(plan) -> str:
    from wftool.launch.skypilot_task import needed_secrets

    return "".join(f"--secret {name} " for name in needed_secrets(plan))


def _secrets_line(plan) -> str:
    import os

    state = [f"{n} ({'set' if os.environ.get(n) else 'not set'})" for n in plan.secrets]
    return "secrets, by name: " + (", ".join(state) or "none")


def _print_checks(passed: list[str], error_console) -> None:
    for line in passed:
        error_console.print(f"[green]ok[/] {line}", highlight=False)
