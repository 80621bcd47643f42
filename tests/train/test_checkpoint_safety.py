"""Checkpoints are safe to load: no pickled code runs, damage is found and the previous
checkpoint used, a full disk loses nothing, and what a killed run left is cleaned up."""

import errno
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console

from tests.train.conftest import small_recipe
from wftool.commands.convert import run_convert
from wftool.errors import WftError
from wftool.recipe import load_recipe
from wftool.train.checkpointing import COMPLETE
from wftool.train.stages import run_pretrain


def _trained(tmp_path, *overrides):
    """A 6-step pretrain run with checkpoints at steps 4 and 6."""
    recipe = load_recipe(small_recipe(tmp_path), list(overrides), stage="pretrain")
    run_convert(recipe)
    run_pretrain(recipe)
    return recipe, Path(recipe.stage_dir("pretrain"))


def _resume(recipe, steps=8):
    """Resume the run to `steps`; returns (the step it resumed from, what it printed)."""
    from wftool.model.checkpoint import load_model_dir
    from wftool.stage_registry import final_dir
    from wftool.train.objectives import LanguageModeling
    from wftool.train.trainer import StageRun, Trainer

    model, tokenizer, meta = load_model_dir(final_dir(recipe, "convert"))
    console = Console(record=True, width=200, file=open("/dev/null", "w"))
    training = recipe.pretrain.training.model_copy(update={"max_steps": steps})
    run = StageRun(recipe=recipe, stage="pretrain", output_dir=Path(recipe.stage_dir("pretrain")),
                   model=model, tokenizer=tokenizer, objective=LanguageModeling(),
                   training=training, data=recipe.data, meta=meta)
    trainer = Trainer(run, console)
    trainer.setup()
    return trainer.step, console.export_text()


class _Payload:
    """Unpickling this would create `marker`: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_state_is_json_and_a_crafted_pickle_never_runs(tmp_path):
    recipe, stage = _trained(tmp_path)
    assert json.loads((stage / "step-6" / "trainer_state.json").read_text())["step"] == 6
    assert json.loads((stage / "step-6" / "rank0.json").read_text())["rng"]["torch"]
    # An attacker's step directory in the older layout (.pt state, marker without digests).
    marker = tmp_path / "code-ran"
    crafted = stage / "step-7"
    crafted.mkdir()
    (crafted / "state").symlink_to(stage / "step-6" / "state")
    with open(crafted / "trainer_state.pt", "wb") as f:
        pickle.dump({"step": 7, "x": _Payload(marker)}, f)
    (crafted / "rank0.pt").write_bytes((crafted / "trainer_state.pt").read_bytes())
    (crafted / COMPLETE).write_text("7\n")
    step, text = _resume(recipe)
    assert not marker.exists()
    assert step == 6 and "skipping unusable checkpoint" in text and "step-7" in text


def test_a_flipped_byte_is_found_and_the_previous_checkpoint_used(tmp_path):
    recipe, stage = _trained(tmp_path)
    shard = next((stage / "step-6" / "state").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    step, text = _resume(recipe)
    assert step == 4
    assert "damaged (checksum mismatch)" in text and "Traceback" not in text
    assert len([line for line in text.splitlines() if "skipping" in line]) == 1


def test_disk_full_while_saving_a_checkpoint_loses_nothing(tmp_path, monkeypatch):
    import wftool.train.checkpointing as checkpointing

    recipe, stage = _trained(tmp_path, "training.max_steps=4")
    real_save = checkpointing.dcp.save

    def full_disk(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)  # half the files written, then:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing.dcp, "save", full_disk)
    longer = load_recipe(small_recipe(tmp_path), ["training.max_steps=6"], stage="pretrain")
    with pytest.raises(WftError, match="the disk is full: writing checkpoint step-6") as err:
        run_pretrain(longer)
    assert "step-4 is intact" in err.value.message and "free space" in err.value.hint
    assert sorted(p.name for p in stage.iterdir() if p.name.startswith(("step-", ".step"))) == [
        "step-2", "step-4"]
    monkeypatch.setattr(checkpointing.dcp, "save", real_save)
    assert run_pretrain(longer).steps == 6  # and the same command then resumes from step 4


def test_disk_full_while_writing_a_model_directory_keeps_the_old_one(tmp_path, monkeypatch):
    from tests.conftest import tiny_llama
    from wftool.model.checkpoint import save_model_dir

    model = tiny_llama()
    out = tmp_path / "model"
    save_model_dir(model, None, out)
    before = (out / "model.safetensors").read_bytes()

    def torn(*args, **kwargs):  # what torch's writer says when a write comes up short
        raise RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 704 "
                           "vs 598")

    monkeypatch.setattr(type(model), "save_pretrained", torn)
    with pytest.raises(WftError, match="the disk is full: writing the model") as err:
        save_model_dir(model, None, out)
    assert "is as it was" in err.value.message
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_what_a_killed_run_left_is_removed_and_pruning_marks_first(tmp_path):
    from wftool.atomic import remove_leftovers
    from wftool.train.checkpointing import CheckpointManager

    recipe, stage = _trained(tmp_path, "training.max_steps=4", "training.keep_last=1")
    (stage / ".step-6.partial" / "state").mkdir(parents=True)
    half_pruned = stage / "step-2"
    (half_pruned / "state").mkdir(parents=True)  # marker already gone, files not yet
    (stage / ".final.tmp-1234abcd").mkdir()
    CheckpointManager(stage)
    remove_leftovers(stage / "final")
    assert sorted(p.name for p in stage.iterdir() if "step" in p.name or p.name.startswith(
        ".final")) == ["step-4"]
    # A kill between the two renames of a replacement: the old copy is put back...
    final = stage / "final"
    final.rename(stage / ".final.old-5678abcd")
    remove_leftovers(final)
    assert (final / "config.json").exists()
    # ... but a copy already being deleted never is.
    (stage / ".final.del-1111aaaa").mkdir()
    (stage / ".final.del-1111aaaa" / "config.json").write_text("{}")
    shutil.rmtree(final)
    remove_leftovers(final)
    assert not final.exists() and not list(stage.glob(".final.*"))
    # A step being replaced, killed between removing the old copy and the rename: the new
    # complete copy is moved into place, not thrown away.
    (stage / "step-4").rename(stage / ".step-4.partial")
    CheckpointManager(stage)
    assert (stage / "step-4" / COMPLETE).exists() and not (stage / ".step-4.partial").exists()


def test_non_finite_weights_and_bad_metadata_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from wftool.model.checkpoint import load_model_dir

    recipe, stage = _trained(tmp_path, "training.max_steps=2")
    final = stage / "final"
    tensors = load_file(final / "model.safetensors")
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, final / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WftError, match=f"tensor '{name}' holds NaN"):
        load_model_dir(final)
    config = json.loads((final / "config.json").read_text())
    config["wft"]["quant_mix"] = "abc"
    (final / "config.json").write_text(json.dumps(config))
    with pytest.raises(WftError, match="quant_mix 'abc' is not a number"):
        load_model_dir(final)
    convert = Path(recipe.stage_dir("convert")) / "final"
    (convert / "tokenizer.json").write_text("{not json")
    with pytest.raises(WftError, match="cannot load the tokenizer"):
        load_model_dir(convert)


def test_checkpoints_in_the_older_pt_layout_still_resume(tmp_path):
    """Step directories written before JSON state (.pt files holding tensors and numpy
    arrays, a marker without digests) load with weights_only and resume."""
    import numpy as np

    recipe, stage = _trained(tmp_path)
    step6 = stage / "step-6"
    trainer_state = json.loads((step6 / "trainer_state.json").read_text())
    del trainer_state["hooks"]  # older checkpoints had none
    rank = json.loads((step6 / "rank0.json").read_text())
    kind, keys, pos, has_gauss, cached = rank["rng"]["numpy"]
    rank["rng"] = {"torch": torch.tensor(rank["rng"]["torch"], dtype=torch.uint8),
                   "numpy": (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
                   "python": tuple(rank["rng"]["python"]), "cuda": None}
    torch.save(trainer_state, step6 / "trainer_state.pt")
    torch.save(rank, step6 / "rank0.pt")
    (step6 / "trainer_state.json").unlink()
    (step6 / "rank0.json").unlink()
    (step6 / COMPLETE).write_text("6\n")
    step, text = _resume(recipe)
    assert step == 6 and "skipping" not in text


def test_disk_full_while_logging_metrics_is_a_clear_error(tmp_path, monkeypatch):
    from wftool.train.metrics import MetricsLog

    recipe, stage = _trained(tmp_path, "training.max_steps=2")

    def full_disk(self, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MetricsLog, "write", full_disk)
    longer = load_recipe(small_recipe(tmp_path), ["training.max_steps=4"], stage="pretrain")
    with pytest.raises(WftError, match="the disk is full: writing metrics.jsonl") as err:
        run_pretrain(longer)
    assert "checkpoints up to step-2 are intact" in err.value.message
    assert (stage / "final" / "recipe.yaml").exists() and (stage / "final" / "eval.json").exists()
