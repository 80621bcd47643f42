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
    state = Path(recipe.stage_dir("pretrain")) / "step-2" / "trainer_state.pt"
    import torch

    saved = torch.load(state, weights_only=False)["hooks"]["quant_warmup"]
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
