"""`wft unified` end to end on a 2-layer model: both losses fall, the checkpoint resumes and
keeps its mask token, and `wft pipeline` runs unified in place of pretrain."""

import json

from typer.testing import CliRunner

from tests.train.conftest import save_small_model, small_recipe
from wftool.cli import app
from wftool.decoding import Decoding, decode
from wftool.model.checkpoint import read_metadata
from wftool.serve.engine_torch import TorchEngine
from wftool.train.metrics import read_metrics

UNIFIED = {"training": {"max_steps": 24, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 2,
                        "save_every": 12, "eval_every": 12, "log_every": 1,
                        "weight_decay": 0.0},
           "curriculum": [{"until": 0.25, "dlm_weight": 0.5}, {"until": 1.0, "dlm_weight": 1.0}],
           "block_size": 8, "qk_clip_tau": None}


def _mean(values):
    return sum(values) / len(values)


def test_a_unified_run_lowers_both_losses_and_resumes_with_its_mask_token(tmp_path):
    recipe = small_recipe(tmp_path, unified=UNIFIED)
    runner = CliRunner()
    assert runner.invoke(app, ["convert", recipe]).exit_code == 0
    first = runner.invoke(app, ["unified", recipe, "training.max_steps=12"])
    assert first.exit_code == 0, first.output
    done = runner.invoke(app, ["unified", recipe])
    assert done.exit_code == 0, done.output
    assert "resumed unified" in done.output and "(step 12)" in done.output
    stage = tmp_path / "runs" / "small" / "unified"
    records = read_metrics(stage / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 25))
    ar = [r["loss_ar"] for r in records]
    dlm = [r["loss_dlm"] for r in records]
    assert _mean(ar[-6:]) < _mean(ar[:6]) - 0.3
    assert _mean(dlm[-6:]) < _mean(dlm[:6]) - 0.3
    assert records[0]["dlm_weight"] == 0.5 and records[-1]["dlm_weight"] == 1.0
    final = stage / "final"
    meta = read_metadata(final)
    config = json.loads((final / "config.json").read_text())
    assert meta.stage == "unified" and config["vocab_size"] == 513
    assert meta.diffusion == {"mask_token_id": 512, "shift": True, "attention": "block",
                              "block_size": 8}
    evaluated = json.loads((final / "eval.json").read_text())
    assert evaluated["eval_dlm"] > 0 and 0 <= evaluated["eval_dlm_accuracy"] <= 1
    # The checkpoint decodes both ways, as `wft serve --backend torch` loads it.
    engine = TorchEngine.load(final)
    prompt = engine.encode("kiza pa povo", chat=False)
    for mode in ("ar", "diffusion", "speculative"):
        tokens = list(decode(engine.model, prompt, 12, Decoding(mode)))
        assert len(tokens) == 12 and 512 not in tokens, mode


def test_the_pipeline_runs_unified_in_place_of_pretrain(tmp_path):
    source = save_small_model(tmp_path / "source")
    recipe = small_recipe(tmp_path, unified=UNIFIED, stages=["convert", "unified", "distill"],
                          pipeline={"baseline": False})
    overrides = [f"model.name_or_path={source}", "model.config=null", "model.tokenizer=null",
                 "unified.training.max_steps=6", "distill.training.max_steps=2"]
    result = CliRunner().invoke(app, ["pipeline", recipe, *overrides])
    assert result.exit_code == 0, result.output
    runs = tmp_path / "runs" / "small"
    table = {row["model"]: row for row in json.loads((runs / "pipeline.json").read_text())}
    assert list(table) == ["teacher (FP, original)", "student after convert",
                           "student after unified", "BitDistill student"]
    unified = table["student after unified"]
    assert unified["text_dlm_loss"] > 0 and 0 <= unified["text_dlm_accuracy"] <= 1
    assert "text_dlm_loss" not in table["teacher (FP, original)"]  # no mask token
    assert table["BitDistill student"]["text_dlm_loss"] > 0  # distilled from unified
    assert read_metadata(runs / "distill" / "final").diffusion is not None
    shown = " ".join(result.output.split())
    assert "diffusion loss" in shown or "diffusion" in shown
