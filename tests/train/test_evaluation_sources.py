"""Training with named held-out sources (`data.eval`): its evaluations score those."""

import json

from typer.testing import CliRunner

from tests.train.conftest import small_recipe
from wftool.cli import app
from wftool.model.checkpoint import load_model_dir
from wftool.recipe.load import load_recipe
from wftool.train.evaluation import eval_batches, evaluate_model


def test_pretrain_evaluates_on_the_named_eval_file(tmp_path):
    val = tmp_path / "val.txt"
    val.write_text("\n\n".join(f"kiza pa povo zafi {i} lu domilu" for i in range(30)) + "\n")
    recipe = small_recipe(tmp_path, data={"seq_len": 32, "eval_batches": 2,
                                          "eval": [{"files": [str(val)]}]})
    runner = CliRunner()
    assert runner.invoke(app, ["convert", recipe]).exit_code == 0
    result = runner.invoke(app, ["pretrain", recipe, "training.max_steps=3"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "small" / "pretrain"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in logged if "eval_loss" in r][-1]
    model, tokenizer, _ = load_model_dir(run / "final")
    data = load_recipe(recipe).data
    batches = eval_batches(data, tokenizer, 4)
    assert len(batches) == 2
    assert last["eval_loss"] == evaluate_model(model, batches, task=False)["eval_loss"]
