"""Global batch -> micro-batch x accumulation per GPU profile, and what an out-of-memory
error tells the user."""

import json
from pathlib import Path

import pytest
import torch

from tests.train.conftest import small_recipe
from wftool.commands.convert import run_convert
from wftool.errors import WftError
from wftool.recipe import load_recipe
from wftool.train import gpu_profiles as gp
from wftool.train.objectives import LanguageModeling
from wftool.train.stages import run_pretrain


def test_plan_batch_takes_the_largest_micro_batch_that_divides_and_fits():
    assert gp.plan_batch(256, 8, 5, "pretrain.training") == (4, 8)
    assert gp.plan_batch(256, 8, 64, "pretrain.training") == (32, 1)
    assert gp.plan_batch(12, 1, 5, "pretrain.training") == (4, 3)
    assert gp.plan_batch(7, 1, 3, "pretrain.training") == (1, 7)  # a prime: one row a time
    with pytest.raises(WftError, match="global_batch_size=12 rows cannot be split evenly over 8"):
        gp.plan_batch(12, 8, 4, "pretrain.training")
    # One process reading a 2-process run's two shards: an even number of micro-batches.
    assert gp.plan_batch(12, 1, 6, "pretrain.training", shards_per_process=2) == (6, 2)
    assert gp.plan_batch(12, 1, 5, "pretrain.training", shards_per_process=2) == (3, 4)
    with pytest.raises(WftError, match="1 process reading 2 data shards each"):
        gp.plan_batch(9, 1, 9, "pretrain.training", shards_per_process=2)


def _qwen3_4b(eager_attention=False) -> gp.ModelSize:
    return gp.ModelSize(trained_params=4_000_000_000, frozen_params=0, frozen_bytes=2,
                        hidden=2560, layers=36, heads=32, vocab=151_936,
                        eager_attention=eager_attention)


def test_memory_estimate_follows_its_formula_and_the_cards():
    size = _qwen3_4b()
    per_row = gp.row_gb(size, 2048, checkpointing=False, teacher=False)
    expected = (36 * 34 * 2048 * 2560 + 2048 * 151_936 * 12) / 1e9
    assert per_row == pytest.approx(expected)
    eager = gp.row_gb(_qwen3_4b(eager_attention=True), 2048, checkpointing=False, teacher=False)
    assert eager == pytest.approx(expected + 36 * 5 * 32 * 2048**2 / 1e9)  # the s^2 scores
    # Checkpointing keeps a layer input each, but the vocabulary's logits stay.
    assert gp.row_gb(size, 2048, checkpointing=True, teacher=False) < per_row / 2
    # fp32 masters + grads + Adam: 16 bytes a parameter, split 8 ways under FSDP2.
    assert gp.fixed_gb(size, 8, sharded=True, teacher_sharded=False) == pytest.approx(8.0)
    assert gp.fixed_gb(size, 8, sharded=False, teacher_sharded=False) == pytest.approx(64.0)
    fits = {name: gp.max_micro_batch(memory, 8.0, per_row, "pretrain.training")
            for name, memory in gp.GPU_MEMORY_GB.items() if memory > 30}
    assert fits["a100-40gb"] < fits["h100"] <= fits["h200"] < fits["b200"]
    # DDP keeps all 64 GB of state on each 80 GB card: no room for a row of 2048 tokens.
    per_row = eager
    with pytest.raises(WftError, match="leave no room for one row") as err:
        gp.max_micro_batch(gp.GPU_MEMORY_GB["h100"], 64.0, per_row, "pretrain.training")
    assert "activation_checkpointing=true" in err.value.hint


def test_no_gpu_profile_on_a_cpu():
    assert gp.detect_profile(torch.device("cpu")) is None


def test_oom_error_names_the_override_that_keeps_the_global_batch():
    err = gp.oom_error(4, 8, 2, "distill.training", checkpointing=False, teacher=True,
                       peak_gb=79.2)
    assert "at step 5 with micro_batch_size=8" in err.message and "79.2 GB" in err.message
    assert err.hint.startswith("try distill.training.micro_batch_size=4 "
                               "distill.training.grad_accum=4 (the same global batch)")
    assert "activation_checkpointing=true" in err.hint and "distributed.teacher=shard" in err.hint
    planned = gp.oom_error(4, 8, 2, "pretrain.training", checkpointing=True, teacher=False,
                           peak_gb=70.0, planned=True)
    assert planned.hint.startswith("try pretrain.training.micro_batch_size=4 (caps")
    last = gp.oom_error(0, 1, 4, "pretrain.training", checkpointing=True, teacher=False,
                        peak_gb=1.0)
    assert "micro_batch_size=" not in last.hint and "seq_len" in last.hint


def test_global_batch_size_sets_micro_batch_and_accumulation(tmp_path):
    path = small_recipe(tmp_path)
    recipe = load_recipe(path, ["training.max_steps=2", "training.save_every=2",
                                "training.global_batch_size=12",
                                "training.micro_batch_size=5"], stage="pretrain")
    run_convert(recipe)
    run_pretrain(recipe)
    stage = Path(recipe.stage_dir("pretrain"))
    state = json.loads((stage / "step-2" / "trainer_state.json").read_text())
    assert state["global_rows"] == 12
    first = json.loads((stage / "metrics.jsonl").read_text().splitlines()[0])
    assert first["tokens"] == 12 * recipe.data.seq_len


class _OutOfMemoryAtStep:
    """Language modelling that runs out of memory at its third call, as a CUDA card would."""

    def __init__(self, *args, **kwargs):
        self.calls = 0
        self.inner = LanguageModeling(*args, **kwargs)

    def __call__(self, model, batch, progress):
        self.calls += 1
        if self.calls == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(model, batch, progress)


def test_out_of_memory_ends_in_a_hint_not_a_traceback(tmp_path, monkeypatch):
    from wftool.train import stages

    path = small_recipe(tmp_path)
    recipe = load_recipe(path, ["training.max_steps=4", "training.grad_accum=1"],
                         stage="pretrain")
    run_convert(recipe)
    monkeypatch.setattr(stages, "LanguageModeling", _OutOfMemoryAtStep)
    with pytest.raises(WftError) as err:
        run_pretrain(recipe)
    assert "CUDA out of memory at step 3 with micro_batch_size=4" in err.value.message
    assert "pretrain.training.micro_batch_size=2 pretrain.training.grad_accum=2" in err.value.hint
    assert (Path(recipe.stage_dir("pretrain")) / "step-2" / "COMPLETE").exists()
