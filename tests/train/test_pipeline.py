"""`wft pipeline` end to end on a 2-layer model: every stage, the teacher and the baseline."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.train.conftest import small_recipe
from wftool.cli import app

SHORT = {"max_steps": 4, "micro_batch_size": 4, "lr": 1e-3, "warmup_steps": 1,
         "save_every": 2, "eval_every": 2}


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_reports_a_table(tmp_path):
    recipe = small_recipe(tmp_path, teacher={"train": {"pretrain": SHORT, "finetune": SHORT}})
    result = CliRunner().invoke(app, ["pipeline", recipe])
    assert result.exit_code == 0, result.output
    runs = tmp_path / "runs" / "small"
    for stage in ("teacher-base", "teacher-sft", "convert", "layerwise", "pretrain", "distill",
                  "baseline/sft"):
        assert (runs / stage / "final" / "config.json").exists() or (
            runs / stage / "config.json").exists(), stage
    table = json.loads((runs / "pipeline.json").read_text())
    labels = [row["model"] for row in table]
    assert labels == ["teacher (FP, pre-trained)", "teacher (FP16-SFT)", "student after convert",
                      "student after layerwise", "student after pretrain", "BitDistill student",
                      "BitNet-SFT baseline"]
    for row in table:
        assert row["text_loss"] > 0 and 0.0 <= row["task_accuracy"] <= 1.0
        # Beside every accuracy: the examples judged and the majority-class floor (the same
        # batches for every model); beside every model: its stage's wall time and tokens.
        assert row["examples"] == table[0]["examples"] > 0
        assert 0.0 < row["majority_accuracy"] == table[0]["majority_accuracy"] <= 1.0
        assert row["seconds"] >= 0 and row["reused"] is False
    trained = {row["model"]: row["tokens"] for row in table}
    assert trained.pop("student after convert") == 0
    metrics = {"teacher (FP, pre-trained)": "teacher-base", "teacher (FP16-SFT)": "teacher-sft",
               "student after layerwise": "layerwise", "student after pretrain": "pretrain",
               "BitDistill student": "distill", "BitNet-SFT baseline": "baseline/sft"}
    for label, stage in metrics.items():
        last = (runs / stage / "metrics.jsonl").read_text().splitlines()[-1]
        assert trained[label] == json.loads(last)["tokens"] > 0, label
    shown = " ".join(result.output.split())
    floor = table[0]["majority_accuracy"]
    assert (f"{table[0]['examples']} examples judged; majority-class floor "
            f"{100 * floor:.1f} %") in shown
    assert "tokens" in shown and "time" in shown
    assert "BitNet-SFT baseline" in result.output
    # The distill teacher is the fine-tuned one the pipeline trained.
    distill_recipe = (runs / "distill" / "final" / "recipe.yaml").read_text()
    assert str(runs / "teacher-sft" / "final") in distill_recipe


def test_training_command_reports_missing_previous_stage(tmp_path):
    recipe = small_recipe(tmp_path)
    result = CliRunner().invoke(app, ["layerwise", recipe])
    assert result.exit_code == 2
    assert "run `wft convert" in result.output and "Traceback" not in result.output


def test_pretrain_command_runs_with_overrides(tmp_path):
    recipe = small_recipe(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, ["convert", recipe]).exit_code == 0
    result = runner.invoke(app, ["pretrain", recipe, "training.max_steps=2"])
    assert result.exit_code == 0, result.output
    assert "pretrain done after 2 steps" in result.output
    assert "small/pretrain step 2/2" in result.output  # plain progress line off a terminal
    metrics = (tmp_path / "runs" / "small" / "pretrain" / "metrics.jsonl").read_text()
    assert len(metrics.splitlines()) == 2


def test_pipeline_table_keeps_model_names_on_an_80_column_terminal(tmp_path):
    from rich.console import Console

    from wftool.commands.pipeline import print_pipeline_table
    from wftool.recipe import load_recipe

    rows = [{"model": name, "text_loss": 1.6663, "text_ppl": 5293.5, "task_loss": 0.0045,
             "task_accuracy": 0.998, "examples": 512, "majority_accuracy": 0.555,
             "tokens": 409_600, "seconds": 321.4, "reused": False}
            for name in ("student after convert (SubLN, no training)", "BitDistill student")]
    console = Console(record=True, width=80, file=open("/dev/null", "w"))
    print_pipeline_table(rows, load_recipe(small_recipe(tmp_path)), console)
    shown = console.export_text()
    assert max(len(line) for line in shown.splitlines()) <= 80
    words = " ".join(shown.replace("│", " ").split())  # cells folded across lines
    for word in ("BitDistill", "student", "convert", "(SubLN,", "5293.50", "99.8", "5 min 21 s",
                 "409.6k", "512 examples judged; majority-class floor 55.5 %"):
        assert word in words, word


def test_text_pipeline_has_the_original_model_and_a_same_token_bitnet_arm(tmp_path):
    """Without a task: the source model as the teacher row, and BitNet-SFT trained on as many
    tokens as layerwise and pretrain together (here 4 + 6 steps of 4 x 32 tokens)."""
    from tests.train.conftest import save_small_model

    source = save_small_model(tmp_path / "source")
    recipe = small_recipe(tmp_path, stages=["convert", "layerwise", "pretrain"])
    overrides = [f"model.name_or_path={source}", "model.config=null", "model.tokenizer=null",
                 "layerwise.training.max_steps=4"]
    result = CliRunner().invoke(app, ["pipeline", recipe, *overrides])
    assert result.exit_code == 0, result.output
    runs = tmp_path / "runs" / "small"
    table = {row["model"]: row for row in json.loads((runs / "pipeline.json").read_text())}
    assert list(table) == ["teacher (FP, original)", "student after convert",
                           "student after layerwise", "student after pretrain",
                           "BitNet-SFT (no SubLN, no layerwise)"]
    baseline = table["BitNet-SFT (no SubLN, no layerwise)"]
    assert baseline["tokens"] == (4 + 6) * 4 * 32
    assert baseline["tokens"] == (table["student after layerwise"]["tokens"]
                                  + table["student after pretrain"]["tokens"])
    assert table["teacher (FP, original)"]["tokens"] is None
    assert table["teacher (FP, original)"]["seconds"] is None  # nothing trained
    assert "task_accuracy" not in baseline
    # Layer-wise is judged on what it trains: its held-out hidden-state loss is in the table.
    layerwise = json.loads((runs / "layerwise" / "final" / "eval.json").read_text())
    assert table["student after layerwise"]["hidden_loss"] == layerwise["eval_hidden"] > 0
    shown = " ".join(result.output.split())
    assert ("student after layerwise: trained on hidden states, not next-token prediction "
            "(held-out hidden-state loss") in shown
    assert "task loss" not in shown  # no task: no task columns
    # With another teacher named, the source model's row says it is only the original.
    again = CliRunner().invoke(app, ["pipeline", recipe, *overrides,
                                     f"teacher.name_or_path={source}"])
    assert again.exit_code == 0, again.output
    rows = [r["model"] for r in json.loads((runs / "pipeline.json").read_text())]
    assert rows[0] == "original model (FP)"
    from wftool.model.checkpoint import read_metadata

    assert read_metadata(runs / "baseline" / "convert").sub_norm == "none"
    assert read_metadata(runs / "convert" / "final").sub_norm == "paper"
