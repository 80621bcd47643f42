"""`wft launch` on SkyPilot, offline: the plan, the rules checked before any network call, the
task (a golden file; SkyPilot's own parser, run in SkyPilot's environment), the run script's
torchrun flags, the `sky jobs launch` command, and secrets that never reach a file or a log.

SkyPilot cannot share wft's environment (its click pin), so the tests that need it run its
Python (`sp.find_sky_python()`) in a subprocess; without it they skip, unless
WFT_REQUIRE_SKYPILOT=1 (CI), where they fail."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from wftool.errors import WftError
from wftool.launch import skypilot_task as sp
from wftool.launch.plan import (
    REMOTE_RUNS_DIR,
    LaunchFlags,
    build_plan,
    parse_gpus,
    pip_install_command,
    source_checkout,
)
from wftool.launch.rules import SKYPILOT_CLOUDS, check_plan, plan_warnings
from wftool.recipe.load import bundled_recipes, load_recipe

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parents[2]
SECRET = "hf_secret_value_123"
WANDB_SECRET = "wandb_secret_value_456"
# Several nodes share a file system (output_dir); one node may keep checkpoints in a bucket.
NEBIUS_2X8 = LaunchFlags(cloud="nebius", gpus="H100:8", nodes=2)
NEBIUS_1X8_BUCKET = LaunchFlags(cloud="nebius", gpus="H100:8", bucket="s3://wft-test/runs")


def _plan(stage="pretrain", flags=NEBIUS_2X8,
          overrides=("launch.network_tier=best", "output_dir=/mnt/shared/wft")):
    return build_plan(load_recipe("tiny", list(overrides)), stage, flags)


def _render(plan, recipe_file="/tmp/wft-launch-x/wft-recipe.yaml"):
    checkout = source_checkout()
    config = sp.task_config(plan, recipe_file, str(checkout) if checkout else None)
    return config, sp.task_yaml(plan, config)


def _normalise(text: str, recipe_file: str) -> str:
    # Machine-dependent paths: this checkout and the temporary recipe file.
    checkout = source_checkout()
    text = text.replace(recipe_file, "<RECIPE_FILE>")
    return text.replace(str(checkout), "<CHECKOUT>") if checkout else text


SKYPILOT_CHECK = """\
import json, sys, yaml
import sky
from sky.utils import registry

def describe(t):
    (r,) = t.resources
    mount = t.storage_mounts["/wft-runs"]
    return {"name": t.name, "num_nodes": t.num_nodes, "run": t.run, "setup": t.setup,
            "workdir": t.workdir, "accelerators": r.accelerators, "use_spot": r.use_spot,
            "cloud": str(r.cloud).lower(), "network_tier": r.network_tier.value,
            "disk_size": r.disk_size, "job_recovery": r.job_recovery,
            "recipe_mount": t.file_mounts["~/wft-recipe.yaml"],
            "bucket": [mount.source, mount.mode.value],
            "secret_refs": sorted(ref.name for ref in t.managed_secret_refs),
            "secret_values": len(t.secrets)}

data = json.load(sys.stdin)
task = sky.Task.from_yaml_config(yaml.safe_load(data["task"]))
again = sky.Task.from_yaml_config(task.to_yaml_config())
reference = sky.Task.from_yaml_config(yaml.safe_load(data["reference"]))
print(json.dumps({"clouds": sorted(registry.CLOUD_REGISTRY), "reference": reference.name,
                  "tasks": [describe(task), describe(again)]}))
"""


def require_skypilot() -> str:
    """SkyPilot's Python; skip without it, or fail when WFT_REQUIRE_SKYPILOT=1 (CI)."""
    python = sp.find_sky_python()
    if python is None:
        message = f"SkyPilot is not installed ({sp.SKY_INSTALL_HINT})"
        if os.environ.get("WFT_REQUIRE_SKYPILOT") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return python


@pytest.fixture(scope="module")
def skypilot_report(tmp_path_factory):
    """One run of SkyPilot's Python (each costs a 2-3 s `import sky`): the rendered task and
    the reference file through `sky.Task.from_yaml_config` (and the task back through
    `to_yaml_config`), and SkyPilot's cloud registry."""
    python = require_skypilot()
    recipe_file = tmp_path_factory.mktemp("launch") / "wft-recipe.yaml"
    plan = _plan(flags=NEBIUS_1X8_BUCKET)  # one node: the bucket mount too
    recipe_file.write_text(plan.recipe_text)
    config, text = _render(plan, str(recipe_file))
    payload = {"task": text, "reference": (REPO / "skypilot" / "wft-train.yaml").read_text()}
    result = subprocess.run([python, "-c", SKYPILOT_CHECK], input=json.dumps(payload),
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    return {**json.loads(result.stdout), "config": config, "recipe_file": str(recipe_file)}


@pytest.fixture
def no_skypilot(monkeypatch, tmp_path):
    """An environment where no SkyPilot is found: nothing on PATH, no .venv-sky."""
    monkeypatch.delenv("WFT_SKY", raising=False)
    monkeypatch.delenv("WFT_SKY_PYTHON", raising=False)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setattr(sp, "_CHECKOUT_SKY_VENV", tmp_path / "no-venv-sky")
    assert sp.find_sky_cli() is None or pytest.skip("a `sky` is installed system-wide")


# -- plan ------------------------------------------------------------------------------------


def test_plan_takes_flags_over_the_recipe_and_moves_output_dir_to_the_bucket():
    plan = _plan(flags=NEBIUS_1X8_BUCKET)
    assert (plan.infra, plan.gpu_type, plan.gpus_per_node, plan.nodes) == ("nebius", "H100", 8, 1)
    assert plan.world_size == 8 and plan.job_name == "wft-tiny-pretrain"
    assert plan.output_dir == REMOTE_RUNS_DIR
    assert yaml.safe_load(plan.recipe_text)["output_dir"] == REMOTE_RUNS_DIR
    assert plan.secrets == ("HF_TOKEN", "WANDB_API_KEY") and plan.extras == ()
    local = build_plan(load_recipe("tiny", ["launch.accelerators=L4"]), "pretrain")
    assert (local.gpu_type, local.gpus_per_node, local.bucket) == ("L4", 1, None)
    assert local.output_dir == "runs"  # no bucket: the node's disk
    assert any("no bucket" in w for w in plan_warnings(local))


def test_wandb_logging_installs_the_extra():
    plan = build_plan(load_recipe("tiny", ["logging.wandb=true"]), "pretrain")
    assert plan.extras == ("wandb",)
    both = build_plan(load_recipe("tiny", ["logging.wandb=true", "logging.tensorboard=true"]),
                      "pretrain")
    assert both.extras == ("wandb", "tensorboard")
    assert pip_install_command(plan.extras, checkout=True) == 'pip install -e ".[wandb]"'
    assert re.fullmatch(r'pip install "wftool\[wandb\]==[0-9][^"]*"',
                        pip_install_command(plan.extras, checkout=False))


def test_source_checkout_is_this_repository():
    assert source_checkout() == REPO


@pytest.mark.parametrize("text, expected", [("H100:8", ("H100", 8)), ("L4", ("L4", 1)),
                                            ("A100-80GB:4", ("A100-80GB", 4))])
def test_parse_gpus(text, expected):
    assert parse_gpus(text) == expected


def test_local_data_files_warn(tmp_path):
    data = tmp_path / "train.txt"
    data.write_text("hello\n")
    plan = build_plan(load_recipe("tiny", [f"data.sources=[{{files: [{data}]}}]"]), "pretrain")
    assert any(str(data) in w and "local file" in w for w in plan.warnings)


# -- rules, before any network call ----------------------------------------------------------


@pytest.mark.parametrize("flags, overrides, stage, message", [
    (LaunchFlags(cloud="nebuis"), [], "pretrain", "unknown cloud 'nebuis'"),
    (LaunchFlags(cloud="runpod", gpus="H100:1", nodes=2), [], "pretrain", "RunPod has no multi"),
    (LaunchFlags(cloud="runpod", bucket="s3://b/x"), [], "pretrain", "RunPod cannot mount"),
    (LaunchFlags(cloud="runpod"), ["launch.network_tier=best"], "pretrain", "RunPod has no net"),
    (LaunchFlags(cloud="nebius", gpus="H100:4"), ["launch.network_tier=best"], "pretrain",
     "8-GPU"),
    (LaunchFlags(cloud="nebius", gpus="A100:8"), ["launch.network_tier=best"], "pretrain",
     "8-GPU"),
    (LaunchFlags(cloud="lambda"), ["launch.network_tier=best"], "pretrain", "not available on"),
    (LaunchFlags(gpus="H100:x"), [], "pretrain", "is not TYPE[:COUNT]"),
    (LaunchFlags(gpus="H100:0"), [], "pretrain", "at least 1"),
    (LaunchFlags(gpus=":8"), [], "pretrain", "is not TYPE[:COUNT]"),
    (LaunchFlags(gpus="H100:8"), [], "pipeline", "launch the stages one by one"),
    (LaunchFlags(gpus="H100:1", nodes=2), [], "pipeline", "launch the stages one by one"),
    (LaunchFlags(bucket="my-bucket"), [], "pretrain", "not a bucket URL"),
    (LaunchFlags(gpus="H100:8"), ["pretrain.training.global_batch_size=12"], "pretrain",
     "cannot be split evenly over 8"),
    (LaunchFlags(gpus="H100:8"), ["distributed.data_shards=4"], "pretrain",
     "cannot be shared evenly by 8"),
    (LaunchFlags(cloud="aws", gpus="H100:8", nodes=2, bucket="s3://b/x"), [], "pretrain",
     "not one directory"),
    (LaunchFlags(backend="modal", cloud="aws"), [], "pretrain", "SkyPilot cloud"),
    (LaunchFlags(backend="slurm"), [], "pretrain", "not a launch backend"),
    (LaunchFlags(), ["launch.secrets=[hf_xyz-secret]"], "pretrain", "not an environment var"),
    (LaunchFlags(), [], "convert", "cannot be launched"),
])
def test_invalid_combinations_are_refused_with_a_hint(flags, overrides, stage, message):
    with pytest.raises(WftError) as err:
        check_plan(build_plan(load_recipe("tiny", overrides), stage, flags))
    assert message in str(err.value) and err.value.hint


@pytest.mark.parametrize("flags, overrides", [
    (NEBIUS_2X8, ["launch.network_tier=best"]),
    (NEBIUS_1X8_BUCKET, ["launch.network_tier=best"]),
    (LaunchFlags(cloud="nebius/eu-north1", gpus="B200:8"), ["launch.network_tier=best"]),
    (LaunchFlags(cloud="runpod", gpus="H100:1"), []),
    (LaunchFlags(cloud="aws/us-east-1", gpus="A100-80GB:4", nodes=4, spot=True), []),
    (LaunchFlags(cloud="k8s"), []),
])
def test_valid_combinations_pass(flags, overrides):
    assert check_plan(build_plan(load_recipe("tiny", overrides), "pretrain", flags))


def test_rules_and_dry_run_work_without_skypilot(no_skypilot):
    # The checks come before anything is sent: without SkyPilot a bad plan still gets its own
    # error, --dry-run prints the task (its SkyPilot check skipped), and submitting says how
    # to install SkyPilot.
    check_plan(build_plan(load_recipe("tiny"), "pretrain", LaunchFlags(cloud="nebius")))
    result = CliRunner().invoke(_app(), ["launch", "tiny", "--stage", "pretrain", "--cloud",
                                         "runpod", "--nodes", "2"])
    assert result.exit_code == 2 and "RunPod has no multi-node" in result.output
    result = CliRunner().invoke(_app(), ["launch", "tiny", "--stage", "pretrain", "--cloud",
                                         "nebius", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "SkyPilot check skipped" in result.output and "uv tool install" in result.output
    assert "name: wft-tiny-pretrain" in result.output
    result = CliRunner().invoke(_app(), ["launch", "tiny", "--stage", "pretrain", "--yes"])
    assert result.exit_code == 2 and "SkyPilot is not installed" in result.output
    assert 'uv tool install "skypilot[nebius,runpod]"' in result.output
    with pytest.raises(WftError, match="click pin"):
        sp.sky_cli()


def test_skypilot_is_found_through_the_environment(monkeypatch, tmp_path, no_skypilot):
    tool = tmp_path / "tool" / "bin"  # `uv tool install`: a PATH link into the tool's venv
    tool.mkdir(parents=True)
    for name in ("sky", "python"):
        (tool / name).write_text("#!/bin/sh\n")
        (tool / name).chmod(0o755)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sky").symlink_to(tool / "sky")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert sp.find_sky_cli() == str(tmp_path / "bin" / "sky")
    assert sp.find_sky_python() == str(tool / "python")
    monkeypatch.setenv("WFT_SKY", str(tool / "sky"))
    monkeypatch.setenv("WFT_SKY_PYTHON", str(tool / "python"))
    assert (sp.sky_cli(), sp.sky_python()) == (str(tool / "sky"), str(tool / "python"))
    monkeypatch.setenv("WFT_SKY", str(tmp_path / "nothing"))
    with pytest.raises(WftError, match="WFT_SKY=.* is not a file"):
        sp.sky_cli()


def test_cloud_list_matches_skypilots_registry(skypilot_report):
    assert sorted(SKYPILOT_CLOUDS) == skypilot_report["clouds"]


@pytest.mark.parametrize("name", sorted(bundled_recipes()))
def test_bundled_recipes_launch_sections_pass_the_rules(name):
    check_plan(build_plan(load_recipe(name), "pretrain"))


# -- the task --------------------------------------------------------------------------------


def test_task_matches_the_golden_file():
    recipe_file = "/tmp/wft-launch-x/wft-recipe.yaml"
    _, text = _render(_plan(), recipe_file)
    text = _normalise(text, recipe_file)
    golden = GOLDEN / "tiny-pretrain-nebius-2xH100-8.yaml"
    if os.environ.get("WFT_UPDATE_GOLDEN") == "1":
        golden.write_text(text)
    assert text == golden.read_text(), "rerun with WFT_UPDATE_GOLDEN=1 if the change is meant"


def test_task_round_trips_through_skypilot(skypilot_report):
    config = skypilot_report["config"]
    for t in skypilot_report["tasks"]:  # as parsed, and after to_yaml_config and back
        assert t["name"] == "wft-tiny-pretrain" and t["num_nodes"] == 1
        assert t["run"] == config["run"] and t["setup"] == config["setup"]
        assert t["workdir"] == str(REPO)
        assert t["accelerators"] == {"H100": 8} and t["use_spot"] is False
        assert t["cloud"] == "nebius"
        assert t["network_tier"] == "best" and t["disk_size"] == 256
        assert t["job_recovery"]["max_restarts_on_errors"] == 3
        assert t["recipe_mount"] == skypilot_report["recipe_file"]
        assert t["bucket"] == ["s3://wft-test/runs", "MOUNT_CACHED"]
        assert t["secret_refs"] == ["HF_TOKEN"]  # no W&B in tiny: no key asked for
        assert t["secret_values"] == 0  # names only: no value anywhere in the task


def test_the_emitted_file_is_the_config():
    config, text = _render(_plan())
    assert yaml.safe_load(text) == config


def test_skypilot_rejects_a_bad_task_with_its_own_message():
    require_skypilot()
    config, _ = _render(_plan())
    config["resources"]["not_a_field"] = 1
    with pytest.raises(WftError, match="SkyPilot rejects the task: .*not_a_field"):
        sp.validate(config)


def test_passed_secrets_are_names_and_optional_ones_may_be_missing(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    names, warnings = sp.passed_secrets(_plan())
    assert names == ("HF_TOKEN",) and "WANDB_API_KEY" in warnings[0]


def test_launch_argv_names_the_job_and_its_secrets():
    plan = _plan()
    assert sp.launch_argv(plan, "/tmp/x/task.yaml", ("HF_TOKEN", "WANDB_API_KEY"),
                          "/opt/sky/bin/sky") == [
        "/opt/sky/bin/sky", "jobs", "launch", "--yes", "--detach-run", "--name",
        "wft-tiny-pretrain", "--secret", "HF_TOKEN", "--secret", "WANDB_API_KEY",
        "/tmp/x/task.yaml"]
    assert sp.launch_argv(plan, "t.yaml", ())[-3:] == ["--name", "wft-tiny-pretrain", "t.yaml"]


def test_submit_hands_sky_names_only(monkeypatch, tmp_path):
    # A stand-in `sky` that records its arguments, the task file it gets, and whether the
    # secret reached its environment; then answers like `sky jobs launch`.
    record = tmp_path / "record.txt"
    fake = tmp_path / "sky"
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$RECORD"\n'
                    'cat "${@: -1}" "$(dirname "${@: -1}")/wft-recipe.yaml" >> "$RECORD"\n'
                    'echo "env HF_TOKEN: ${HF_TOKEN:+set}" >> "$RECORD"\n'
                    'echo "Managed Job ID: 42"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("WFT_SKY", str(fake))
    monkeypatch.setenv("RECORD", str(record))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    lines = []
    assert sp.submit(_plan(flags=NEBIUS_1X8_BUCKET), str(REPO), lines.append) == "42"
    text = record.read_text()
    assert "launch\n--yes\n--detach-run\n--name\nwft-tiny-pretrain\n--secret\nHF_TOKEN\n" in text
    assert "secrets:\n  HF_TOKEN: null\nsetup" in text  # the unset optional one left out
    assert "output_dir: /wft-runs" in text and "env HF_TOKEN: set" in text
    assert SECRET not in text and all(SECRET not in line for line in lines)
    assert "Managed Job ID: 42" in lines and "WANDB_API_KEY" in lines[0]


def test_a_missing_required_secret_is_named(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    with pytest.raises(WftError, match="secret HF_TOKEN is not set") as err:
        sp.passed_secrets(_plan())
    assert WANDB_SECRET not in str(err.value)
    wandb = build_plan(load_recipe("tiny", ["logging.wandb=true"]), "pretrain")
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    with pytest.raises(WftError, match="WANDB_API_KEY"):
        sp.passed_secrets(wandb)  # W&B on: its key is required


def test_pipeline_runs_without_torchrun_flags():
    plan = _plan("pipeline", LaunchFlags(cloud="runpod", gpus="H100:1"), ())
    assert check_plan(plan)
    assert sp.run_script(plan).splitlines()[-1] == "wft pipeline ~/wft-recipe.yaml"


def test_reference_task_file_matches_the_renderer(skypilot_report):
    reference = yaml.safe_load((REPO / "skypilot" / "wft-train.yaml").read_text())
    plan = _plan()
    assert reference["run"] == sp.run_script(plan)
    assert reference["setup"] == sp.setup_script(plan, checkout=True)
    assert set(reference) == set(sp.task_config(plan, "r.yaml", "."))
    assert skypilot_report["reference"] == "wft-train"  # SkyPilot parsed it


# -- the run script on node rank 1 of 2 ------------------------------------------------------


def run_on_node(script: str, tmp_path: Path, rank: int, path: str, dry_run: bool = False,
                recipe_text: str = "") -> str:
    """Run a task's `run` script as SkyPilot would on node `rank` of 2 (8 GPUs each), with
    `wft` taken from `path`; `dry_run` appends ` --dry-run` to its last line, the wft
    command, which then prints its torchrun command instead of training."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / "wft-recipe.yaml").write_text(recipe_text)
    env = {**os.environ, "HOME": str(home), "PATH": path, "SKYPILOT_NUM_NODES": "2",
           "SKYPILOT_NODE_RANK": str(rank), "SKYPILOT_NUM_GPUS_PER_NODE": "8",
           "SKYPILOT_NODE_IPS": "10.0.0.1\n10.0.0.2\n"}
    text = script.rstrip("\n") + (" --dry-run\n" if dry_run else "\n")
    result = subprocess.run(["bash", "-c", text], env=env, capture_output=True, text=True,
                            cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_run_script_passes_node_rank_1_of_2(tmp_path):
    # A stand-in `wft` that prints its arguments: what the script hands the real one.
    fake = tmp_path / "bin" / "wft"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out = run_on_node(sp.run_script(_plan()), tmp_path, 1, f"{fake.parent}:/usr/bin:/bin")
    assert out.split("\n")[:-1] == [
        "pretrain", str(tmp_path / "home" / "wft-recipe.yaml"), "--nproc-per-node", "8",
        "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1"]


def _wft_has_dry_run() -> bool:
    wft = Path(sys.executable).with_name("wft")
    help_text = subprocess.run([str(wft), "pretrain", "--help"], capture_output=True,
                               text=True, env={**os.environ, "COLUMNS": "200"}).stdout
    return "--dry-run" in help_text


def test_torchrun_command_for_node_rank_1_of_2(tmp_path):
    if not _wft_has_dry_run():
        pytest.skip("`wft pretrain` has no --dry-run yet")
    plan = _plan()
    out = run_on_node(sp.run_script(plan), tmp_path, 1,
                      f"{Path(sys.executable).parent}:/usr/bin:/bin", dry_run=True,
                      recipe_text=plan.recipe_text.replace(REMOTE_RUNS_DIR, str(tmp_path)))
    command = out.split(" -m wftool ")[0]  # the launcher's part, before wft's own arguments
    assert re.search(r"\btorchrun\b|torch\.distributed\.run", command), out
    for flag, value in (("nnodes", "2"), ("node-rank", "1"), ("nproc-per-node", "8"),
                        ("master-addr", "10.0.0.1")):
        assert re.search(rf"--{flag}[ =]{re.escape(value)}\b", command.replace("_", "-")), out


# -- the command -----------------------------------------------------------------------------


def _app() -> typer.Typer:
    from wftool.cli import _FlagGroup
    from wftool.commands.launch import register

    app = typer.Typer(cls=_FlagGroup, rich_markup_mode="rich", pretty_exceptions_enable=False)
    app.callback()(lambda: None)
    register(app)
    return app


def test_cli_dry_run_and_emit_yaml_write_no_secret(tmp_path, monkeypatch):
    require_skypilot()
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    task_file = tmp_path / "task.yaml"
    result = CliRunner().invoke(_app(), [
        "launch", "tiny", "training.max_steps=7", "--stage", "pretrain", "--cloud", "nebius",
        "--gpus", "H100:8", "--nodes", "2", "output_dir=/mnt/shared/wft", "--dry-run",
        "--emit-yaml", str(task_file)])
    assert result.exit_code == 0, result.output
    assert "ok SkyPilot accepts the task" in result.output
    assert "HF_TOKEN (set)" in result.output and "num_nodes: 2" in result.output
    recipe = yaml.safe_load((tmp_path / "task.recipe.yaml").read_text())
    assert recipe["pretrain"]["training"]["max_steps"] == 7  # the override travels
    assert yaml.safe_load(task_file.read_text())["file_mounts"]["~/wft-recipe.yaml"] == str(
        tmp_path / "task.recipe.yaml")
    texts = [result.output] + [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    for text in texts:
        assert SECRET not in text and WANDB_SECRET not in text


def test_cli_refuses_before_any_network_call():
    result = CliRunner().invoke(_app(), ["launch", "tiny", "--stage", "pretrain", "--cloud",
                                         "runpod", "--gpus", "H100:1", "--nodes", "2"])
    assert result.exit_code == 2
    assert "RunPod has no multi-node" in result.output and "hint:" in result.output
    result = CliRunner().invoke(_app(), ["launch", "tiny"])
    assert result.exit_code == 2 and "needs --stage" in result.output


def test_cli_actions_check_their_arguments():
    for args, message in ((["logs"], "usage: wft launch logs JOB"),
                          (["down", "1", "2"], "usage: wft launch down JOB"),
                          (["status", "--backend", "ray"], "not a launch backend")):
        result = CliRunner().invoke(_app(), ["launch", *args])
        assert result.exit_code == 2 and message in result.output, result.output
    assert sp._job_args("12") == ["12"] and sp._job_args("wft-tiny") == ["--name", "wft-tiny"]


def test_remote_install_adds_the_file_system_sync_to_needs():
    from wftool.launch.plan import LaunchFlags, build_plan
    from wftool.recipe import load_recipe

    recipe = load_recipe("tiny", ["sync_to=s3://bucket/wft", "logging.wandb=true"],
                         stage="pretrain")
    plan = build_plan(recipe, "pretrain", LaunchFlags(cloud="runpod", gpus="H100:1"))
    assert plan.extras == ("wandb", "s3")
    plain = build_plan(load_recipe("tiny", [], stage="pretrain"), "pretrain",
                       LaunchFlags(cloud="runpod", gpus="H100:1"))
    assert plain.extras == ()
