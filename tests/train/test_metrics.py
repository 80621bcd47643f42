"""The metrics sinks: JSONL resume after a torn line, one W&B run per stage directory."""

import json
import re
import sys

import pytest

from wftool.errors import WftError
from wftool.train.metrics import MetricsLog, WandbSink, read_metrics


def test_metrics_resume_drops_torn_and_garbage_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    # A kill mid-write leaves a torn last line with no newline; a crash may leave junk.
    path.write_text("\n".join(good[:3] + ["\x00\x00garbage", "[1, 2]"] + good[3:])
                    + '\n{"step": 6, "lo')
    log = MetricsLog(path, resume_step=4)
    log.write({"step": 5, "loss": 0.5})
    log.close()
    assert [(m["step"], m["loss"]) for m in read_metrics(path)] == [
        (1, 1.0), (2, 0.5), (3, 1.0 / 3), (4, 0.25), (5, 0.5)]


def test_metrics_resume_past_the_torn_line_appends_cleanly(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "los')
    log = MetricsLog(path, resume_step=10)
    log.write({"step": 3})
    log.close()
    assert [m["step"] for m in read_metrics(path)] == [1, 2, 3]


# ---- the live bar -----------------------------------------------------------------------------
def test_wandb_sink_resumes_one_run_under_the_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # Where wandb could write besides the run: cwd, home, and its own config/data dirs.
    # (Its service's debug logs go to WANDB_CACHE_DIR whatever the run dir is.)
    for name, env in (("home", "HOME"), ("config", "WANDB_CONFIG_DIR"),
                      ("data", "WANDB_DATA_DIR"), ("cache", "WANDB_CACHE_DIR")):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(env, str(tmp_path / name))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    run_dir = tmp_path / "runs" / "small" / "pretrain"

    first = WandbSink("wft-test", "small-pretrain", {"lr": 1e-3}, run_dir)
    first.write({"step": 1, "loss": 2.0})
    first.close()
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    id_written = (run_dir / "wandb_run_id").stat().st_mtime_ns
    second = WandbSink("wft-test", "small-pretrain", {"lr": 1e-3}, run_dir)
    second.write({"step": 2, "loss": 1.5})
    second.close()

    assert first.run_id == second.run_id == run_id and len(run_id) == 8
    assert (run_dir / "wandb_run_id").stat().st_mtime_ns == id_written
    # offline-run-<time>-<id>, with "-1" added when two starts share a second.
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2
    for run in offline_runs:
        assert re.fullmatch(rf"offline-run-[0-9_]+-{run_id}(-\d+)?", run.name)
        assert (run / f"run-{run_id}.wandb").is_file()
    for name in ("cwd", "home", "config", "data"):
        assert [p for p in (tmp_path / name).rglob("*") if p.is_file()] == [], name
    outside = {p.relative_to(tmp_path).parts[0] for p in tmp_path.iterdir()}
    assert outside == {"runs", "cwd", "home", "config", "data", "cache"}


def test_wandb_sink_without_wandb_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(WftError, match="wandb is not installed"):
        WandbSink("p", "n", {}, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---- TensorBoard ------------------------------------------------------------------------------

def _tensorboard_scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_tensorboard_holds_the_metrics_log_across_a_kill_and_resume(tmp_path):
    pytest.importorskip("tensorboard")
    import shutil
    from pathlib import Path

    from tests.train.conftest import small_recipe
    from wftool.commands.convert import run_convert
    from wftool.recipe import load_recipe
    from wftool.train.stages import run_pretrain

    path = small_recipe(tmp_path, logging={"tensorboard": True})
    recipe = load_recipe(path, stage="pretrain")
    run_convert(recipe)
    run_pretrain(recipe)
    stage = Path(recipe.stage_dir("pretrain"))
    # Killed after step 4's checkpoint: steps 5 and 6 were logged, their checkpoint lost.
    shutil.rmtree(stage / "final")
    shutil.rmtree(stage / "step-6")
    run_pretrain(load_recipe(path, ["training.lr=5e-4"], stage="pretrain"))
    logged = [(m["step"], m["loss"]) for m in read_metrics(stage / "metrics.jsonl")]
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6]
    board = _tensorboard_scalars(stage / "tensorboard", "loss")
    # One value per step, the resumed run's (other lr) for 5 and 6, as in metrics.jsonl.
    assert [s for s, _ in board] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in board] == pytest.approx([v for _, v in logged], rel=1e-6)
    evals = _tensorboard_scalars(stage / "tensorboard", "eval_loss")
    assert [s for s, _ in evals] == [3, 6]


def test_tensorboard_sink_without_tensorboard_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    from wftool.train.metrics import TensorBoardSink

    with pytest.raises(WftError, match="tensorboard is not installed") as err:
        TensorBoardSink(tmp_path / "tb")
    assert "wftool[tensorboard]" in err.value.hint
