"""Runs do what the user asked: the warm-up continues across stages and resumes, a finished
run says so, `resume.mode=never` starts over without losing the old run, and a random
teacher is refused."""

import json
from pathlib import Path

import pytest
from rich.console import Console

from tests.train.conftest import save_small_model, small_recipe
from wftool.commands.convert import run_convert
from wftool.errors import WftError
from wftool.model.checkpoint import load_model_dir, read_metadata
from wftool.recipe import load_recipe
from wftool.train.metrics import read_metrics
from wftool.train.stages import run_distill, run_layerwise, run_pretrain


def _console():
    return Console(record=True, width=200, file=open("/dev/null", "w"))


def _mixes(recipe, stage):
    metrics = Path(recipe.stage_dir(stage)) / "metrics.jsonl"
    return [round(m["quant_mix"], 6) for m in read_metrics(metrics)]


def test_warmup_mix_runs_once_across_stages_and_survives_resume(tmp_path):
    from wftool.export.gguf_target import plan_gguf_export
    from wftool.model.families import family_by_name
    from wftool.quant.ternary_linear import TernaryLinear
    from wftool.quant.bitlinear import BitLinear

    path = small_recipe(tmp_path, quantization={"warmup_steps": 10})
    recipe = load_recipe(path)
    run_convert(recipe)
    assert read_metadata(Path(recipe.stage_dir("convert")) / "final").quant_mix == 0.0
    layerwise = run_layerwise(recipe)
    assert _mixes(recipe, "layerwise") == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    model, tokenizer, meta = load_model_dir(layerwise.final_dir)
    assert meta.quant_mix == pytest.approx(0.6)
    # A student stopped mid warm-up is refused by export and by the torch serving engine.
    _, blockers = plan_gguf_export(model, family_by_name(meta.family), meta.sub_norm,
                                   meta.quant_mix, "f16", None)
    assert any("warm-up is unfinished (mix 0.600" in b.reason for b in blockers)
    layer = next(m for m in model.modules() if isinstance(m, BitLinear))
    with pytest.raises(WftError, match="warm-up is unfinished"):
        TernaryLinear.from_bitlinear(layer)
    # pretrain continues the ramp (0.7, 0.8, ...), also across a stop and a resume.
    run_pretrain(load_recipe(path, ["training.max_steps=2"], stage="pretrain"))
    assert _mixes(recipe, "pretrain") == [0.7, 0.8]
    state = Path(recipe.stage_dir("pretrain")) / "step-2" / "trainer_state.json"
    saved = json.loads(state.read_text())["hooks"]["quant_warmup"]
    assert saved["start"] == pytest.approx(0.6) and saved["mix"] == pytest.approx(0.8)
    pretrained = run_pretrain(recipe)
    assert _mixes(recipe, "pretrain") == [0.7, 0.8, 0.9, 1.0, 1.0, 1.0]
    assert read_metadata(pretrained.final_dir).quant_mix == 1.0
    _, blockers = plan_gguf_export(*_plan_args(pretrained.final_dir))
    assert not any("warm-up" in b.reason for b in blockers)


def _plan_args(final):
    from wftool.model.families import family_by_name

    model, _, meta = load_model_dir(final)
    return model, family_by_name(meta.family), meta.sub_norm, meta.quant_mix, "f16", None


def test_finished_run_says_so_and_extends_only_when_asked(tmp_path):
    path = small_recipe(tmp_path)
    recipe = load_recipe(path, ["training.max_steps=4"], stage="pretrain")
    run_convert(recipe)
    first = run_pretrain(recipe)
    weights = first.final_dir / "model.safetensors"
    written = weights.stat().st_mtime_ns
    console = _console()
    again = run_pretrain(recipe, console)
    text = console.export_text()
    assert "already complete (4/4 steps)" in text and "pretrain.training.max_steps" in text
    assert again.steps == 4 and again.eval == first.eval
    assert weights.stat().st_mtime_ns == written  # nothing retrained, final/ untouched
    with pytest.raises(WftError, match="already at step 4, past training.max_steps=2") as err:
        run_pretrain(load_recipe(path, ["training.max_steps=2"], stage="pretrain"))
    assert "resume.mode=never" in err.value.hint
    longer = run_pretrain(load_recipe(path, ["training.max_steps=6"], stage="pretrain"))
    assert longer.steps == 6
    metrics = read_metrics(Path(recipe.stage_dir("pretrain")) / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]


def test_resume_never_moves_the_old_run_aside(tmp_path):
    path = small_recipe(tmp_path)
    recipe = load_recipe(path, ["training.max_steps=4"], stage="pretrain")
    run_convert(recipe)
    run_pretrain(recipe)
    stage_dir = Path(recipe.stage_dir("pretrain"))
    console = _console()
    fresh = load_recipe(path, ["training.max_steps=2", "resume.mode=never"], stage="pretrain")
    result = run_pretrain(fresh, console)
    assert result.steps == 2  # trained from step 0, not "past max_steps"
    (aside,) = stage_dir.parent.glob("pretrain.replaced-*")
    assert f"moved the previous pretrain run to {aside}" in console.export_text()
    assert (aside / "step-4" / "COMPLETE").exists() and (aside / "final").is_dir()
    assert [m["step"] for m in read_metrics(stage_dir / "metrics.jsonl")] == [1, 2]
    assert not (stage_dir / "step-4").exists()
    # The next plain run continues the new run, not the old one.
    resumed = run_pretrain(load_recipe(path, ["training.max_steps=3"], stage="pretrain"))
    assert resumed.steps == 3
    assert [m["step"] for m in read_metrics(stage_dir / "metrics.jsonl")] == [1, 2, 3]


def test_distill_refuses_a_random_weight_teacher(tmp_path):
    path = small_recipe(tmp_path)
    recipe = load_recipe(path)
    run_convert(recipe)
    with pytest.raises(WftError, match="randomly initialised") as err:
        run_distill(recipe)
    assert "teacher.name_or_path" in err.value.hint and "teacher-sft" in err.value.hint
    teacher = save_small_model(tmp_path / "teacher")
    named = load_recipe(path, [f"teacher.name_or_path={teacher}",
                               "distill.training.max_steps=1"])
    assert run_distill(named).steps == 1
    saved = json.loads((Path(recipe.stage_dir("distill")) / "final" / "config.json").read_text())
    assert saved["wft"]["stage"] == "distill"


class _NanAtStep:
    """Language modelling whose loss turns NaN on one optimizer step (1-based)."""

    def __init__(self, bad_step: int):
        from wftool.train.objectives import LanguageModeling

        self.inner, self.bad_step, self.calls = LanguageModeling(), bad_step, 0
        self.hooks = [self]
        self.name = "nan_probe"
        self.seen = []

    def __call__(self, model, batch, progress):
        self.calls += 1
        loss, parts = self.inner(model, batch, progress)
        return (loss * float("nan") if self.calls == self.bad_step else loss), parts

    # A step hook too: the trainer runs it around every step and checkpoints its state.
    def before_step(self, step):
        self.seen.append(("before", step))

    def after_step(self, step):
        self.seen.append(("after", step))

    def metrics(self):
        return {"probe_calls": float(self.calls)}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_non_finite_loss_is_caught_before_a_checkpoint_and_hooks_run_each_step(tmp_path):
    """Losses reach the host once per logging step, but a NaN still stops the run before
    the next checkpoint is written, naming the step it happened at."""
    import torch

    from wftool.train.trainer import StageRun, Trainer

    path = small_recipe(tmp_path)
    recipe = load_recipe(path, ["training.log_every=10", "training.save_every=2"],
                         stage="pretrain")
    run_convert(recipe)
    model, tokenizer, meta = load_model_dir(Path(recipe.stage_dir("convert")) / "final")
    objective = _NanAtStep(bad_step=4)  # the call below, then steps 1, 2 and 3 of train()
    stage_dir = Path(recipe.stage_dir("pretrain"))
    trainer = Trainer(StageRun(recipe=recipe, stage="pretrain", output_dir=stage_dir,
                               model=model, tokenizer=tokenizer, objective=objective,
                               training=recipe.pretrain.training, data=recipe.data, meta=meta))
    trainer.setup()
    record = trainer.train_step()
    assert torch.is_tensor(record["loss"]) and record["probe_calls"] == 1.0
    assert objective.seen == [("before", 0), ("after", 0)]
    with pytest.raises(WftError, match="loss is nan at step 3"):
        trainer.train()
    assert (stage_dir / "step-2" / "COMPLETE").exists()
    assert not (stage_dir / "step-4").exists() and not (stage_dir / "final").exists()
    saved = json.loads((stage_dir / "step-2" / "trainer_state.json").read_text())
    assert saved["hooks"]["nan_probe"] == {"calls": 3}
    assert [m["probe_calls"] for m in read_metrics(stage_dir / "metrics.jsonl")] == [2.0, 3.0]


def test_pipeline_refuses_a_random_teacher_before_training_anything(tmp_path):
    from typer.testing import CliRunner

    from wftool.cli import app

    path = small_recipe(tmp_path)
    result = CliRunner().invoke(app, ["pipeline", path])
    assert result.exit_code == 2 and "randomly initialised" in result.output
    assert not (tmp_path / "runs").exists()


def test_pipeline_teacher_runs_keep_their_own_resume_settings(tmp_path):
    """`pretrain.resume.mode=never` restarts the student's pretrain, not the teacher's."""
    from wftool.commands.pipeline import run_pipeline

    short = {"max_steps": 2, "micro_batch_size": 4, "lr": 1e-3, "warmup_steps": 1,
             "save_every": 2, "eval_every": 2}
    path = small_recipe(tmp_path, teacher={"train": {"pretrain": short, "finetune": short}},
                        stages=["convert", "pretrain"], pipeline={"baseline": False})
    run_pipeline(load_recipe(path, ["pretrain.training.max_steps=2"]), _console())
    console = _console()
    run_pipeline(load_recipe(path, ["pretrain.training.max_steps=2",
                                    "pretrain.resume.mode=never"]), console)
    text = console.export_text()
    runs = tmp_path / "runs" / "small"
    assert "moved the previous pretrain run" in text
    assert not list(runs.glob("teacher-*.replaced-*"))
    assert text.count("already complete") == 2  # teacher-base and teacher-sft


def test_distill_continues_the_warmup_and_never_twice_in_a_second_keeps_both(
        tmp_path, monkeypatch):
    teacher = save_small_model(tmp_path / "teacher")
    path = small_recipe(tmp_path, quantization={"warmup_steps": 10})
    overrides = [f"teacher.name_or_path={teacher}", "distill.training.max_steps=2"]
    recipe = load_recipe(path, overrides)
    run_convert(recipe)
    run_distill(recipe)
    assert _mixes(recipe, "distill") == [0.1, 0.2]
    import wftool.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module.time, "strftime", lambda fmt: "20260101-000000")
    for _ in range(2):  # both restarts land in the same second
        run_distill(load_recipe(path, overrides + ["distill.resume.mode=never"]))
    stage_dir = Path(recipe.stage_dir("distill"))
    assert len(list(stage_dir.parent.glob("distill.replaced-*"))) == 2


def test_a_stage_estimates_its_length_from_the_first_step(tmp_path, monkeypatch):
    import wftool.train.trainer as trainer_module

    path = small_recipe(tmp_path)
    recipe = load_recipe(path, ["training.max_steps=5"], stage="pretrain")
    run_convert(recipe)
    ticks = iter(range(0, 10_000, 3))  # every clock read moves 3 s: the first step takes 3 s
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: float(next(ticks)))
    console = _console()
    run_pretrain(recipe, console)
    assert "first step 3.00 s; the other 4 take about 12 s" in console.export_text()
    from wftool.train.progress import format_duration

    assert [format_duration(t) for t in (4.24, 37, 125, 3725)] == [
        "4.2 s", "37 s", "2 min 05 s", "1 h 02 min"]


def test_progress_shows_the_tokens_per_second_the_metrics_log_holds(tmp_path):
    import re

    path = small_recipe(tmp_path)
    recipe = load_recipe(path, ["training.max_steps=4", "training.log_every=2"],
                         stage="pretrain")
    run_convert(recipe)
    console = _console()
    run_pretrain(recipe, console)
    logged = {m["step"]: m["tok/s"] for m in read_metrics(
        Path(recipe.stage_dir("pretrain")) / "metrics.jsonl")}
    shown = {int(m.group(1)): m.group(2) for m in re.finditer(
        r"step (\d+)/4 .*?tok/s ([\d,]+)", console.export_text())}
    assert shown and all(shown[s] == f"{logged[s]:,.0f}" for s in shown), (shown, logged)


def test_data_shards_are_fixed_by_the_first_checkpoint(tmp_path):
    """One process reading two shards (the global batch of two processes) resumes with its
    shards; asking for another split is refused with the way out, nothing trained."""
    path = small_recipe(tmp_path)
    two_shards = ["training.max_steps=2", "distributed.data_shards=2", "training.grad_accum=2"]
    recipe = load_recipe(path, two_shards, stage="pretrain")
    run_convert(recipe)
    run_pretrain(recipe)
    longer = load_recipe(path, ["training.max_steps=4", "distributed.data_shards=1"],
                         stage="pretrain")
    with pytest.raises(WftError, match="distributed.data_shards=1, but the run") as err:
        run_pretrain(longer)
    assert "resume.mode=never" in err.value.hint
    console = _console()
    resumed = run_pretrain(load_recipe(path, ["training.max_steps=4", "training.grad_accum=4"],
                                       stage="pretrain"), console)
    assert resumed.steps == 4
    assert "global batch changes from 8 rows per step" in console.export_text()
