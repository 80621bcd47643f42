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
