"""`wft launch --backend modal`, offline and without a Modal token: the app module imports and
registers `train` with no credentials, the launch plan reaches its decorators through
WFT_MODAL_* variables, Modal's GPU rules are checked before any network call, and
`train.local(...)` runs the tiny recipe on this CPU with the Volume's directory in tmp."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from wftool.errors import WftError
from wftool.launch import modal_backend as mb
from wftool.launch.plan import LaunchFlags, build_plan
from wftool.recipe.load import load_recipe

REPO = Path(__file__).resolve().parents[2]
APP_FILE = REPO / "modal_apps" / "wft_app.py"
# Imports the app module as `modal run` does, and prints what its decorators were given.
_IMPORT = f"""
import importlib.util, json, sys
from dataclasses import asdict
import modal
spec = importlib.util.spec_from_file_location("wft_app", {str(APP_FILE)!r})
module = importlib.util.module_from_spec(spec)
sys.modules["wft_app"] = module
spec.loader.exec_module(module)
assert isinstance(module.train, modal.Function) and isinstance(module.app, modal.App)
print(json.dumps(asdict(module.CONFIG)))
"""


def _import_app(tmp_path, **env) -> dict:
    """Import the app in a fresh interpreter with no Modal token anywhere: an empty HOME
    (no ~/.modal.toml) and no MODAL_* variables."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("MODAL_", "WFT_MODAL_"))}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-c", _IMPORT], env={**clean, "HOME": str(home), **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _as_json(config: mb.ModalConfig) -> dict:
    return json.loads(json.dumps(asdict(config)))


def _plan(stage="pretrain", **flags):
    return build_plan(load_recipe("tiny"), stage, LaunchFlags(backend="modal", **flags))


def test_app_imports_without_a_token(tmp_path):
    config = _import_app(tmp_path)
    assert config == _as_json(mb.ModalConfig(gpu="H100:1"))
    assert config["secrets"] == []  # nothing to resolve, and no token needed to import


def test_the_plan_reaches_the_decorators(tmp_path):
    plan = _plan(gpus="a100-80gb:4")
    mb.check_modal_plan(plan)
    env = mb.plan_env(plan)
    assert set(env) <= set(mb.ENV_KEYS)
    config = _import_app(tmp_path, **env)
    assert config == _as_json(mb.config_from_env(env))
    assert config["gpu"] == "A100-80GB:4"
    assert config["app_name"] == "wft-tiny-pretrain"
    assert config["volume"] == "wft-runs" and config["nodes"] == 1
    assert config["secrets"] == ["HF_TOKEN"]  # tiny does not log to W&B: no key asked for
    assert config["retries"] == 3
    logged = build_plan(load_recipe("tiny", ["logging.wandb=true"]), "pretrain",
                        LaunchFlags(backend="modal", gpus="L4"))
    assert mb.modal_secrets(logged) == ("HF_TOKEN", "WANDB_API_KEY")
    # The recipe's SkyPilot infra is not a Modal error; --cloud is.
    nebius = build_plan(load_recipe("tiny", ["launch.infra=nebius"]), "pretrain",
                        LaunchFlags(backend="modal", gpus="L4"))
    assert nebius.infra is None and mb.check_modal_plan(nebius)


def test_several_nodes_import_as_a_cluster(tmp_path):
    config = _import_app(tmp_path, WFT_MODAL_GPU="H200:8", WFT_MODAL_NODES="2",
                         WFT_MODAL_TIMEOUT="3600")
    assert (config["gpu"], config["nodes"], config["timeout"]) == ("H200:8", 2, 3600)


@pytest.mark.parametrize("gpus, nodes, message", [
    ("H1000:8", 1, "did you mean H100"),
    ("RTX4090", 1, "Modal has no GPU type"),
    ("H100:9", 1, "1 to 8 H100"),
    ("H100:0", 1, "1 to 8 H100"),
    ("A10G:8", 1, "1 to 4 A10G"),
    ("H100:x", 1, "whole number"),
    ("L4:1", 2, "all 8 GPUs"),
    ("H100:4", 2, "all 8 GPUs"),
    ("H100:8", 33, "1 to 32"),
])
def test_gpus_modal_refuses(gpus, nodes, message):
    with pytest.raises(WftError, match=message):
        mb.check_gpus(gpus, nodes)


def test_gpus_modal_accepts():
    assert mb.check_gpus("h100:8", 4) == ("H100", 8)
    assert mb.check_gpus("L4") == ("L4", 1)
    assert mb.check_gpus("A100-80GB:2") == ("A100-80GB", 2)


def test_plan_rules_before_any_network_call():
    assert any("Volume wft-runs" in line for line in mb.check_modal_plan(_plan(gpus="L4")))
    with pytest.raises(WftError, match="did you mean H100"):
        mb.check_modal_plan(_plan(gpus="H10:8"))
    restarts = build_plan(load_recipe("tiny", ["launch.max_restarts=50"]), "pretrain",
                          LaunchFlags(backend="modal", gpus="L4"))
    with pytest.raises(WftError, match="at most 10 times"):
        mb.check_modal_plan(restarts)
    with pytest.raises(WftError, match="not one checkpoint directory"):
        mb.check_modal_plan(_plan(gpus="H100:8", nodes=2))


def test_bad_environment_is_a_clear_error():
    with pytest.raises(WftError, match="WFT_MODAL_NODES"):
        mb.config_from_env({"WFT_MODAL_NODES": "two"})
    with pytest.raises(WftError, match="Modal has no GPU type"):
        mb.config_from_env({"WFT_MODAL_GPU": "TPU"})


def test_submit_without_a_token_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "none.toml"))
    with pytest.raises(WftError) as err:
        mb.submit(_plan(gpus="L4"))
    assert "modal token new" in str(err.value)
    with pytest.raises(WftError, match="modal token new"):
        mb.status("ap-" + "x" * 22)


def test_submit_without_modal_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "modal", None)  # what `import modal` sees uninstalled
    with pytest.raises(WftError) as err:
        mb.submit(_plan(gpus="L4"))
    assert "wftool[cloud]" in str(err.value)


def test_stage_command_on_a_cluster():
    command = mb.stage_command("pretrain", "/tmp/r.yaml", ["a=1"], 8, 2, 1, "fd00::1")
    assert command[1:] == ["-m", "wftool", "pretrain", "/tmp/r.yaml", "a=1",
                           "--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1",
                           "--master-addr", "fd00::1"]
    assert "--nnodes" not in mb.stage_command("pretrain", "r.yaml", [], 8)


@pytest.fixture
def wft_app(monkeypatch):
    for key in mb.ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    spec = importlib.util.spec_from_file_location("wft_app", APP_FILE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "wft_app", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The train function is executing locally:UserWarning")
def test_train_runs_the_tiny_recipe_locally(wft_app, tmp_path, monkeypatch):
    monkeypatch.setenv("WFT_MODAL_ROOT", str(tmp_path / "volume"))
    recipe_text = _plan().recipe_text  # what `wft launch` sends: output_dir /wft-runs
    small = ["teacher.train=null", "data.seq_len=64"]
    convert = wft_app.train.local(recipe_text, "pipeline",
                                  [*small, "stages=[convert]", "pipeline.baseline=false"])
    assert convert["stage"] == "pipeline"
    assert convert["final_dir"] == str(tmp_path / "volume" / "tiny" / "convert" / "final")
    summary = wft_app.train.local(recipe_text, "pretrain", [
        *small, "training.max_steps=2", "training.eval_every=2", "training.save_every=2",
        "training.micro_batch_size=2", "training.warmup_steps=1"])
    final = tmp_path / "volume" / "tiny" / "pretrain" / "final"
    assert summary["stage"] == "pretrain" and summary["steps"] == 2
    assert summary["final_dir"] == str(final) and (final / "config.json").is_file()
    assert summary["eval"]["eval_loss"] > 0
    assert "error" not in summary


@pytest.mark.filterwarnings("ignore:The train function is executing locally:UserWarning")
def test_train_reports_a_user_error_instead_of_retrying(wft_app, tmp_path, monkeypatch):
    monkeypatch.setenv("WFT_MODAL_ROOT", str(tmp_path / "volume"))
    summary = wft_app.train.local(_plan().recipe_text, "pretrain", ["training.max_step=2"])
    assert summary["stage"] == "pretrain"
    assert "did you mean 'max_steps'" in summary["error"]
