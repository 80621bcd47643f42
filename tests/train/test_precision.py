"""The GPU path, run on CPU: a bf16 checkpoint trained under bf16 autocast keeps fp32 master
weights and optimizer state, its weights move at small learning rates, and its losses track
the same run computed in fp32."""

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from tests.train.conftest import save_small_model
from wftool.commands.convert import run_convert
from wftool.model.checkpoint import load_model_dir
from wftool.recipe import load_recipe
from wftool.train.metrics import read_metrics
from wftool.train.stages import run_distill, run_layerwise, run_pretrain, run_unified

TRAINING = {"max_steps": 6, "micro_batch_size": 4, "lr": 1e-3, "warmup_steps": 2,
            "save_every": 3, "eval_every": 3, "log_every": 2}
# bf16 keeps 8 significant bits: per-step losses of the two runs differ by up to ~3e-3
# relative here (ternary codes that flip near a rounding boundary included); 2 % leaves
# room for other CPUs' accumulation order and is far below what a broken path shows.
LOSS_RTOL = 0.02


def _recipe_file(tmp_path: Path, source: str, dtype: str, precision: str, **extra) -> str:
    import yaml

    training = dict(TRAINING, precision=precision)
    task = {"format": "task", "seq_len": 32, "eval_fraction": 0.1, "eval_batches": 2}
    recipe = {
        "name": "small", "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": source, "dtype": dtype},
        "teacher": {"name_or_path": source, "dtype": dtype},
        "data": {"seq_len": 32, "eval_fraction": 0.1, "eval_batches": 2},
        "layerwise": {"training": training}, "pretrain": {"training": training},
        "unified": {"training": training, "block_size": 8,
                    "curriculum": [{"until": 1.0, "dlm_weight": 1.0}]},
        "distill": {"training": training, "data": task, "attention_weight": 10.0},
        **extra,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _saved_float_dtypes(step_dir: Path) -> dict[str, set]:
    """dtypes of the floating tensors a checkpoint holds, by top-level key (model, optim)."""
    metadata = FileSystemReader(str(step_dir / "state")).read_metadata()
    found: dict[str, set] = {}
    for key, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata) and item.properties.dtype.is_floating_point:
            found.setdefault(key.split(".", 1)[0], set()).add(item.properties.dtype)
    return found


def _losses(recipe, stage) -> list[float]:
    return [m["loss"] for m in read_metrics(Path(recipe.stage_dir(stage)) / "metrics.jsonl")]


@pytest.mark.slow
def test_every_stage_trains_a_bf16_checkpoint_in_bf16_with_fp32_masters(tmp_path):
    """unified included: Muon + QK-clip, [clean | noisy] block rows, its mask token row."""
    source = save_small_model(tmp_path / "source", "bfloat16")
    losses, evals = {}, {}
    for precision, dtype in (("bf16", "auto"), ("fp32", "float32")):
        recipe = load_recipe(_recipe_file(tmp_path / precision, source, dtype, precision))
        run_convert(recipe)
        for stage, run in (("layerwise", run_layerwise), ("pretrain", run_pretrain),
                           ("unified", run_unified), ("distill", run_distill)):
            result = run(recipe)
            losses[precision, stage] = _losses(recipe, stage)
            evals[precision, stage] = result.eval
            stage_dir = Path(recipe.stage_dir(stage))
            # Checkpoints hold fp32 masters and fp32 optimizer state (Adam moments)...
            assert _saved_float_dtypes(stage_dir / "step-6") == {
                "model": {torch.float32}, "optim": {torch.float32}}
            # ... and so does final/, which says so in config.json for the next stage.
            config = json.loads((result.final_dir / "config.json").read_text())
            assert config["dtype"] == "float32"
            model, _, _ = load_model_dir(result.final_dir)
            assert {p.dtype for p in model.parameters()} == {torch.float32}
        if precision == "bf16":  # the converted student kept the checkpoint's dtype
            converted = json.loads((Path(recipe.stage_dir("convert")) / "final" /
                                    "config.json").read_text())
            assert converted["dtype"] == "bfloat16"
    for stage in ("layerwise", "pretrain", "unified", "distill"):
        bf16, fp32 = torch.tensor(losses["bf16", stage]), torch.tensor(losses["fp32", stage])
        assert len(bf16) == len(fp32) == 6 and torch.isfinite(bf16).all()
        torch.testing.assert_close(bf16, fp32, rtol=LOSS_RTOL, atol=0.0, msg=stage)
        assert bf16.ne(fp32).any(), f"{stage}: bf16 autocast was not in force"
    # Layer-wise's own held-out objective (teacher forward included) under autocast too.
    hidden = {p: evals[p, "layerwise"]["eval_hidden"] for p in ("bf16", "fp32")}
    assert hidden["bf16"] == pytest.approx(hidden["fp32"], rel=0.05) and hidden["bf16"] > 0


def test_small_learning_rate_moves_bf16_checkpoint_weights(tmp_path):
    """At lr 5e-5 on N(0, 0.02) weights an Adam step is below half a bf16 ulp for most
    entries: only fp32 masters move them."""
    from wftool.quant.bitlinear import BitLinear

    source = save_small_model(tmp_path / "source", "bfloat16")
    one_step = {"training.max_steps=1", "training.lr=5e-5", "training.warmup_steps=0",
                "training.schedule=constant", "training.weight_decay=0"}
    recipe = load_recipe(_recipe_file(tmp_path, source, "auto", "bf16"),
                         sorted(one_step), stage="pretrain")
    run_convert(recipe)
    before, _, _ = load_model_dir(Path(recipe.stage_dir("convert")) / "final")
    after, _, _ = load_model_dir(run_pretrain(recipe).final_dir)
    layers = [n for n, m in before.named_modules() if isinstance(m, BitLinear)]
    for name in layers:
        old = before.get_submodule(name).weight.float()
        new = after.get_submodule(name).weight
        assert new.dtype == torch.float32
        moved = (new != old).float().mean().item()
        assert moved > 0.9, f"{name}: only {moved:.0%} of the weights moved"


@pytest.mark.slow
def test_pipeline_runs_in_bf16_from_a_bf16_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from wftool.cli import app

    source = save_small_model(tmp_path / "source", "bfloat16")
    short = dict(TRAINING, max_steps=2, save_every=2, eval_every=2, precision="bf16")
    path = _recipe_file(tmp_path, source, "auto", "bf16",
                        teacher={"train": {"pretrain": short, "finetune": short}})
    overrides = [f"{s}.training.max_steps=2" for s in ("layerwise", "pretrain", "distill")]
    result = CliRunner().invoke(app, ["pipeline", path, *overrides])
    assert result.exit_code == 0, result.output
    assert "bf16 autocast compute, fp32 master weights" in result.output
    runs = tmp_path / "runs" / "small"
    table = json.loads((runs / "pipeline.json").read_text())
    assert len(table) == 7
    for row in table:
        assert torch.isfinite(torch.tensor([row["text_loss"], row["task_loss"]])).all(), row
    for trained in ("teacher-base", "teacher-sft", "layerwise", "pretrain", "distill",
                    "baseline/sft"):
        config = json.loads((runs / trained / "final" / "config.json").read_text())
        assert config["dtype"] == "float32", trained
