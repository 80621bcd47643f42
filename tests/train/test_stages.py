"""Stages end to end on a 2-layer model: discovery, resume, reset flags, corrupt checkpoints."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wftool.commands.convert import run_convert
from wftool.errors import WftError
from wftool.recipe import load_recipe
from wftool.train.metrics import read_metrics
from wftool.train.stages import find_init, run_distill, run_layerwise, run_pretrain


def _stage_dir(recipe, stage):
    return Path(recipe.stage_dir(stage))


def test_stages_find_previous_outputs(recipe_file, tmp_path):
    from tests.train.conftest import save_small_model

    teacher = save_small_model(tmp_path / "teacher")
    recipe = load_recipe(recipe_file, [f"teacher.name_or_path={teacher}"])
    with pytest.raises(WftError, match="run `wft convert"):
        find_init(recipe, "layerwise")
    run_convert(recipe)
    convert_final = _stage_dir(recipe, "convert") / "final"
    assert find_init(recipe, "layerwise") == convert_final
    assert find_init(recipe, "pretrain") == convert_final
    result = run_layerwise(recipe)
    assert find_init(recipe, "pretrain") == result.final_dir
    pretrained = run_pretrain(recipe)
    assert find_init(recipe, "distill") == pretrained.final_dir
    distilled = run_distill(recipe)
    assert "eval_accuracy" in distilled.eval
    parts = read_metrics(_stage_dir(recipe, "distill") / "metrics.jsonl")[-1]
    assert {"loss_ce", "loss_kl", "loss_relation"} <= set(parts)
    explicit = load_recipe(recipe_file, [f"pretrain.init={convert_final}"])
    assert find_init(explicit, "pretrain") == convert_final


def test_checkpoints_are_complete_atomic_and_pruned(recipe_file):
    recipe = load_recipe(recipe_file, ["pretrain.training.keep_last=2"])
    run_convert(recipe)
    run_pretrain(recipe)
    stage = _stage_dir(recipe, "pretrain")
    steps = sorted(p.name for p in stage.glob("step-*"))
    assert steps == ["step-4", "step-6"]
    assert (stage / "latest").read_text().strip() == "step-6"
    for step in steps:
        assert (stage / step / "COMPLETE").exists()
        assert (stage / step / "recipe.yaml").exists() and (stage / step / "versions.json").exists()
    assert not list(stage.glob(".*partial*"))
    assert (stage / "final" / "config.json").exists()
    assert [m["step"] for m in read_metrics(stage / "metrics.jsonl")] == list(range(1, 7))


def _trainer(recipe):
    from wftool.model.checkpoint import load_model_dir
    from wftool.train.objectives import LanguageModeling
    from wftool.train.trainer import StageRun, Trainer

    model, tokenizer, meta = load_model_dir(find_init(recipe, "pretrain"))
    stage = recipe.pretrain
    run = StageRun(recipe=recipe, stage="pretrain", output_dir=_stage_dir(recipe, "pretrain"),
                   model=model, tokenizer=tokenizer, objective=LanguageModeling(),
                   training=stage.training, data=recipe.data, resume=stage.resume, meta=meta)
    trainer = Trainer(run)
    trainer.setup()
    return trainer


@pytest.mark.parametrize("load_optimizer,load_scheduler", [(True, True), (False, True),
                                                           (True, False)])
def test_resume_flags_really_reset(recipe_file, load_optimizer, load_scheduler):
    recipe = load_recipe(recipe_file, ["pretrain.training.max_steps=4"])
    run_convert(recipe)
    run_pretrain(recipe)
    resumed = load_recipe(recipe_file, [
        "pretrain.training.max_steps=8",
        f"pretrain.resume.load_optimizer={str(load_optimizer).lower()}",
        f"pretrain.resume.load_scheduler={str(load_scheduler).lower()}",
    ])
    trainer = _trainer(resumed)
    assert trainer.step == 4
    optimizer_state = trainer.optimizers[0].state
    if load_optimizer:
        steps = {int(s["step"]) for s in optimizer_state.values()}
        assert steps == {4}
    else:
        assert len(optimizer_state) == 0
    assert trainer.schedulers[0].last_epoch == (4 if load_scheduler else 0)


def test_corrupt_latest_checkpoint_falls_back_to_previous(recipe_file, capsys):
    from rich.console import Console

    recipe = load_recipe(recipe_file)
    run_convert(recipe)
    run_pretrain(recipe)
    stage = _stage_dir(recipe, "pretrain")
    for shard in (stage / "step-6" / "state").glob("*.distcp"):
        shard.write_bytes(b"garbage")
    from wftool.model.checkpoint import load_model_dir
    from wftool.train.objectives import LanguageModeling
    from wftool.train.trainer import StageRun, Trainer

    model, tokenizer, meta = load_model_dir(find_init(recipe, "pretrain"))
    console = Console(file=open(os.devnull, "w"), record=True)
    run = StageRun(recipe=recipe, stage="pretrain", output_dir=stage, model=model,
                   tokenizer=tokenizer, objective=LanguageModeling(),
                   training=recipe.pretrain.training, data=recipe.data, meta=meta)
    trainer = Trainer(run, console)
    trainer.setup()
    assert trainer.step == 4
    assert "skipping unusable checkpoint" in console.export_text()


def _wft(*args, env_extra=None):
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", **(env_extra or {}))
    return [sys.executable, "-m", "wftool", *args], env


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_loss_sequence(tmp_path):
    from tests.train.conftest import small_recipe

    common = ["pretrain.training.max_steps=60", "pretrain.training.save_every=10",
              "pretrain.training.eval_every=1000", "pretrain.training.keep_last=3"]
    straight_recipe = small_recipe(tmp_path / "a")
    killed_recipe = small_recipe(tmp_path / "b")
    for path in (straight_recipe, killed_recipe):
        recipe = load_recipe(path)
        run_convert(recipe)
    cmd, env = _wft("pretrain", straight_recipe, *common)
    subprocess.run(cmd, env=env, check=True, capture_output=True)

    cmd, env = _wft("pretrain", killed_recipe, *common)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage = Path(load_recipe(killed_recipe).stage_dir("pretrain"))
    deadline = time.monotonic() + 120
    while not (stage / "step-20" / "COMPLETE").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (stage / "final").exists(), "the run finished before the kill"
    subprocess.run(cmd, env=env, check=True, capture_output=True)

    straight = read_metrics(Path(load_recipe(straight_recipe).stage_dir("pretrain")) /
                            "metrics.jsonl")
    resumed = read_metrics(stage / "metrics.jsonl")
    assert [m["step"] for m in resumed] == list(range(1, 61))
    torch.testing.assert_close(torch.tensor([m["loss"] for m in resumed]),
                               torch.tensor([m["loss"] for m in straight]), rtol=1e-5, atol=1e-6)


def test_all_checkpoints_corrupt_is_a_clear_error(recipe_file):
    recipe = load_recipe(recipe_file)
    run_convert(recipe)
    run_pretrain(recipe)
    stage = _stage_dir(recipe, "pretrain")
    for shard in stage.glob("step-*/state/*.distcp"):
        shard.write_bytes(b"garbage")
    with pytest.raises(WftError, match="no usable checkpoint") as err:
        _trainer(recipe)
    assert "resume.mode=never" in str(err.value)


def test_sync_to_uploads_finals_and_later_stages_fetch_them(tmp_path):
    import fsspec

    from tests.train.conftest import small_recipe

    url = f"memory://wft-test-{tmp_path.name}"
    recipe = load_recipe(small_recipe(tmp_path), [f"sync_to={url}"])
    run_convert(recipe)
    fs = fsspec.filesystem("memory")
    remote_final = f"{url}/small/convert/final"
    assert fs.exists(remote_final + "/config.json")
    # The local copy is gone (a new cloud machine): layerwise finds the remote one.
    import shutil

    shutil.rmtree(_stage_dir(recipe, "convert"))
    init = find_init(recipe, "layerwise")
    assert (init / "model.safetensors").exists() and init.name == "init"
    explicit = load_recipe(small_recipe(tmp_path), [f"pretrain.init={remote_final}"])
    assert (find_init(explicit, "pretrain") / "config.json").exists()


def test_wandb_offline_run_is_written_under_the_stage_and_resumed(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tests.train.conftest import small_recipe

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    path = small_recipe(tmp_path)
    recipe = load_recipe(path, ["logging.wandb=true", "pretrain.training.max_steps=2"])
    run_convert(recipe)
    run_pretrain(recipe)
    stage = _stage_dir(recipe, "pretrain")
    run_id = (stage / "wandb_run_id").read_text().strip()
    # wandb names a run's folder offline-run-<time>-<id>, with "-1" when a second start
    # falls in the same second.
    of_this_run = re.compile(rf"offline-run-[0-9_]+-{run_id}(-\d+)?")
    runs = list((stage / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and of_this_run.fullmatch(runs[0].name)
    # Extending the run continues the same W&B run.
    run_pretrain(load_recipe(path, ["logging.wandb=true", "pretrain.training.max_steps=3"]))
    runs = list((stage / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(of_this_run.fullmatch(r.name) for r in runs)


def test_teacher_directory_loads_in_the_recipe_teacher_dtype(tmp_path):
    from tests.conftest import tiny_llama
    from wftool.model.tokenizer import train_synthetic_tokenizer
    from wftool.train.stages import load_teacher

    tiny_llama(vocab_size=512).save_pretrained(tmp_path / "teacher")
    train_synthetic_tokenizer(512).save_pretrained(tmp_path / "teacher")
    as_saved, family = load_teacher(str(tmp_path / "teacher"))
    halved, _ = load_teacher(str(tmp_path / "teacher"), "bfloat16")
    assert family.name == "llama" and as_saved.dtype == torch.float32
    assert {p.dtype for p in halved.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in halved.parameters())


def test_layerwise_reports_its_own_objective_on_held_out_data(recipe_file, tmp_path):
    """eval_hidden is the hidden-state loss of the student against the teacher on the eval
    batches, computed as training computes it; next-token numbers are shown as such."""
    from rich.console import Console

    from tests.train.conftest import save_small_model
    from wftool.data.packing import model_inputs
    from wftool.model.checkpoint import load_model_dir
    from wftool.train.evaluation import eval_batches, evaluate_model
    from wftool.train.objectives import LayerwiseDistillation, hidden_state_loss, layer_weights
    from wftool.train.stages import load_teacher

    teacher_dir = save_small_model(tmp_path / "teacher")
    recipe = load_recipe(recipe_file, [f"teacher.name_or_path={teacher_dir}"])
    run_convert(recipe)
    console = Console(record=True, width=200, file=open(os.devnull, "w"))
    result = run_layerwise(recipe, console)
    evals = [m for m in read_metrics(_stage_dir(recipe, "layerwise") / "metrics.jsonl")
             if "eval_hidden" in m]
    assert [m["step"] for m in evals] == [3, 6] and all(m["eval_hidden"] > 0 for m in evals)
    summary = console.export_text()
    assert "eval_hidden" in summary and "next-token eval_loss" in summary

    student, tokenizer, _ = load_model_dir(result.final_dir)
    teacher, _ = load_teacher(teacher_dir)
    batches = eval_batches(recipe.data, tokenizer, recipe.layerwise.training.micro_batch_size)
    objective = LayerwiseDistillation(teacher, recipe.layerwise, 2)
    got = evaluate_model(student, batches, task=False, held_out=objective.held_out)
    total = weight = 0.0
    with torch.no_grad():
        for batch in batches:
            inputs = model_inputs(batch)
            s = student(**inputs, output_hidden_states=True).hidden_states[1:]
            t = teacher(**inputs, output_hidden_states=True).hidden_states[1:]
            n = int(batch["labels"][:, 1:].ne(-100).sum())
            total += n * float(hidden_state_loss(list(s), list(t), layer_weights(2, "linear"),
                                                 recipe.layerwise.normalize,
                                                 batch.get("attention_mask")))
            weight += n
    assert got["eval_hidden"] == pytest.approx(total / weight, rel=1e-4)
    assert got["eval_hidden"] == pytest.approx(evals[-1]["eval_hidden"], rel=1e-3)


def test_a_stage_starts_from_the_most_recently_finished_candidate(recipe_file):
    """An older run of another stage it may follow (pretrain before unified) is not taken
    over the output just made (layerwise)."""
    recipe = load_recipe(recipe_file)
    for stage, age in (("pretrain", 3600), ("layerwise", 0)):
        final = _stage_dir(recipe, stage) / "final"
        final.mkdir(parents=True)
        (final / "config.json").write_text("{}")
        stamp = time.time() - age
        os.utime(final / "config.json", (stamp, stamp))
    assert find_init(recipe, "unified") == _stage_dir(recipe, "layerwise") / "final"
    unified = _stage_dir(recipe, "unified") / "final"
    unified.mkdir(parents=True)
    (unified / "config.json").write_text("{}")
    assert find_init(recipe, "distill") == unified
