"""`data.eval`: in-training eval, `wft eval RECIPE` and the pipeline table score the named
held-out sources, on the same batches, with the same numbers."""

import json

import pytest
import yaml
from rich.console import Console

from tests.eval.conftest import packed_rows, read_jsonl
from wftool.commands.evaluate import EvalOptions, run_eval
from wftool.commands.pipeline import PipelineRow, _evaluate_rows
from wftool.data.packing import IGNORE_INDEX
from wftool.eval.heldout import file_documents, same_tokens
from wftool.model.checkpoint import load_model_dir
from wftool.recipe.load import load_recipe
from wftool.train.evaluation import eval_batches, evaluate_model

quiet = Console(quiet=True)


def _recipe(tmp_path, student_dir, **sections):
    """A recipe whose only run output is a converted student, and a training file of its own
    (so a held-out document drawn from it would show)."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": f"kiza pa povo {i}"}) + "\n" for i in range(9)))
    path = tmp_path / "named.yaml"
    path.write_text(yaml.safe_dump({"name": "named", "output_dir": str(tmp_path / "runs"),
                                    "model": {"name_or_path": str(student_dir)}, **sections}))
    converted = tmp_path / "runs" / "named" / "convert" / "final"
    converted.parent.mkdir(parents=True)
    converted.symlink_to(student_dir)
    return str(path)


def _text_data(tmp_path, text_file, eval_batches=100):
    return {"sources": [{"files": [str(tmp_path / "train.jsonl")]}],
            "eval": [{"files": [str(text_file)]}], "seq_len": 24, "eval_batches": eval_batches}


def test_eval_batches_hold_exactly_the_eval_file(tokenizer, student_dir, text_file, tmp_path):
    recipe = load_recipe(_recipe(tmp_path, student_dir, data=_text_data(tmp_path, text_file)))
    batches = eval_batches(recipe.data, tokenizer, 2)
    rows = [r for b in batches for r in b["input_ids"].tolist()]
    expected = packed_rows(tokenizer, file_documents(text_file, "text"), 24)
    assert rows == [[t for seg in segments for t in seg] for segments in expected]
    # At most data.eval_batches batches: the first ones.
    first = eval_batches(recipe.data.model_copy(update={"eval_batches": 1}), tokenizer, 2)
    assert same_tokens(first, batches[:1])


def test_task_eval_batches_hold_every_example_of_the_eval_file(tokenizer, task_file,
                                                               tmp_path, student_dir):
    recipe = load_recipe(_recipe(tmp_path, student_dir, data={
        "format": "task", "eval": [{"files": [str(task_file)]}], "seq_len": 48}))
    batches = eval_batches(recipe.data, tokenizer, 5)
    answers = [b["labels"][r][b["labels"][r].ne(IGNORE_INDEX)].tolist()[:-1]
               for b in batches for r in range(b["labels"].shape[0])]
    assert answers == [tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
                       for row in read_jsonl(task_file)]


@pytest.mark.parametrize("batch_size", [2, 3])
def test_wft_eval_of_the_recipe_equals_in_training_eval(batch_size, tokenizer, student_dir,
                                                        text_file, task_file, tmp_path):
    recipe_path = _recipe(tmp_path, student_dir, data=_text_data(tmp_path, text_file),
                          distill={"data": {"format": "task", "seq_len": 48,
                                            "eval": [{"files": [str(task_file)]}]}})
    report = run_eval([recipe_path], EvalOptions(batch_size=batch_size), quiet)
    (row,) = [r for r in report.models if r["model"] == "student after convert"]
    text, task = report.sets
    assert text["origin"] == "named: data (eval)" and text["complete"]
    assert text["documents"] == len(file_documents(text_file, "text"))
    assert task["examples"] == len(read_jsonl(task_file))
    recipe = load_recipe(recipe_path)
    model, _, _ = load_model_dir(student_dir)
    trained_text = evaluate_model(model, eval_batches(recipe.data, tokenizer, batch_size),
                                  task=False)
    trained_task = evaluate_model(model, eval_batches(recipe.distill.data, tokenizer,
                                                      batch_size), task=True)
    assert row["text_loss"] == trained_text["eval_loss"]
    assert row["task_loss"] == trained_task["eval_loss"]
    assert row["task_accuracy"] == trained_task["eval_accuracy"]


def test_pipeline_table_scores_the_eval_sources(tokenizer, student_dir, text_file, task_file,
                                               tmp_path):
    recipe = load_recipe(_recipe(tmp_path, student_dir, data=_text_data(tmp_path, text_file),
                                 distill={"data": {"format": "task", "seq_len": 48,
                                                   "eval": [{"files": [str(task_file)]}]}}))
    (entry,) = _evaluate_rows(recipe, [PipelineRow("student", student_dir, 0.0, 0)])
    model, _, _ = load_model_dir(student_dir)
    text = evaluate_model(model, eval_batches(recipe.data, tokenizer, 16), task=False)
    task = evaluate_model(model, eval_batches(recipe.distill.data, tokenizer, 32), task=True)
    assert entry["text_loss"] == text["eval_loss"]
    assert (entry["task_loss"], entry["task_accuracy"]) == (task["eval_loss"],
                                                            task["eval_accuracy"])
    assert entry["examples"] == len(read_jsonl(task_file))
