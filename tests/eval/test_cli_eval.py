"""`wft eval` as a user runs it: a table and a JSON file, recipes expanded into everything
they produced, and one clear line for every bad input."""

import json
import sys
from collections import Counter

import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import require_llamacpp
from tests.eval.conftest import (
    assert_matches,
    read_jsonl,
    reference_numbers,
    require_lm_eval,
    tiny_llama,
)
from tests.train.conftest import SMALL_MODEL, small_recipe
from wftool.cli import app
from wftool.model.checkpoint import load_model_dir, save_model_dir
from wftool.recipe.load import load_recipe
from wftool.train.evaluation import eval_batches, evaluate_model

runner = CliRunner()


def _eval(*args):
    return runner.invoke(app, ["eval", *map(str, args)])


def test_eval_prints_a_table_and_writes_json(student_dir, teacher_dir, text_file, task_file,
                                             tmp_path, tokenizer):
    out = tmp_path / "results.json"
    result = _eval(teacher_dir, student_dir, "--text", text_file, "--task", task_file,
                   "--seq-len", 48, "--batch-size", 3, "--output", out)
    assert result.exit_code == 0, result.output
    for heading in ("text loss", "text ppl", "task loss", "task acc %", "ternary", "FP (float32)"):
        assert heading in result.output
    report = json.loads(out.read_text())
    assert [row["path"] for row in report["models"]] == [str(teacher_dir), str(student_dir)]
    for row in report["models"]:
        assert_matches(row, reference_numbers(row["path"], text_file, task_file, 48, 3))
    text_set = report["sets"][0]
    assert (text_set["documents"], text_set["complete"]) == (7, True)
    shown = " ".join(result.output.split())  # rich wraps long lines
    assert f"all 7 documents, {text_set['tokens']:,} scored tokens" in shown
    # Every accuracy comes with its example count and the majority-class floor: the share of
    # the most frequent answer (tokens, EOS excluded) among the judged examples.
    answers = Counter(tuple(tokenizer(row["answer"], add_special_tokens=False)["input_ids"])
                      for row in read_jsonl(task_file))
    task_set = report["sets"][1]
    assert task_set["examples"] == sum(answers.values())
    floor = max(answers.values()) / sum(answers.values())
    assert task_set["majority_accuracy"] == pytest.approx(floor)
    for row in report["models"]:
        assert (row["examples"], row["task_examples"]) == (task_set["examples"],) * 2
        assert row["majority_accuracy"] == pytest.approx(floor)
    # The same examples for every model: one line under the table says count and floor.
    assert (f"task acc %: {task_set['examples']} examples judged; majority-class floor "
            f"{100 * floor:.1f} %") in shown


def test_eval_table_notes_accuracies_at_the_majority_floor_and_ties(
        student_dir, tmp_path, tokenizer):
    """Every answer the same: any model that answers it scores the floor, 100 %; the same
    model twice is a tie."""
    task = tmp_path / "one-class.jsonl"
    task.write_text("".join(json.dumps({"prompt": f"kiza {i} ->", "answer": " pa"}) + "\n"
                            for i in range(6)))
    out = tmp_path / "r.json"
    result = _eval(student_dir, student_dir, "--task", task, "--output", out)
    assert result.exit_code == 0, result.output
    first, second = json.loads(out.read_text())["models"]
    assert (first["examples"], first["majority_accuracy"]) == (6, 1.0)
    shown = " ".join(result.output.split())
    assert "6 examples judged; majority-class floor 100.0 %" in shown
    at_floor = first["task_accuracy"] * 6 >= 5  # within one example of the floor
    assert ("at the majority-class floor" in shown) == at_floor
    assert f"tie: {first['model']} and {second['model']} score the same" in shown


def _recipe_run(tmp_path):
    """What `wft pipeline` leaves, in small: a fine-tuned teacher and a converted student."""
    recipe = small_recipe(tmp_path)
    assert runner.invoke(app, ["convert", recipe]).exit_code == 0
    runs = tmp_path / "runs" / "small"
    _, tokenizer, _ = load_model_dir(runs / "convert" / "final")
    config = {k: v for k, v in SMALL_MODEL.items() if k != "model_type"}
    teacher = save_model_dir(tiny_llama(**config), tokenizer, runs / "teacher-sft" / "final")
    # The trainer saves the resolved recipe beside every final/ directory.
    resolved = load_recipe(recipe).model_dump(mode="json", by_alias=True)
    (teacher / "recipe.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    return recipe, runs


def test_eval_recipe_covers_teacher_and_students_on_the_training_eval_batches(tmp_path):
    recipe, runs = _recipe_run(tmp_path)
    out = tmp_path / "r.json"
    result = _eval(recipe, "--output", out, "--batch-size", 4)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [r["model"] for r in report["models"]] == ["teacher (FP16-SFT)",
                                                      "student after convert"]
    assert [s["origin"] for s in report["sets"]] == ["small: data (eval split)",
                                                     "small: distill.data (eval split)"]
    config = load_recipe(recipe)
    for row in report["models"]:
        model, tokenizer, _ = load_model_dir(row["path"])
        # The very batches and code the trainer evaluates with.
        text = evaluate_model(model, eval_batches(config.data, tokenizer, 4), task=False)
        task = evaluate_model(model, eval_batches(config.distill.data, tokenizer, 4), task=True)
        assert row["text_loss"] == pytest.approx(text["eval_loss"], rel=1e-6)
        assert row["task_loss"] == pytest.approx(task["eval_loss"], rel=1e-6)
        assert row["task_accuracy"] == task.get("eval_accuracy")
        assert row["text_tokens"] == 2 * 4 * 31  # data.eval_batches x rows x (seq_len - 1)
    # Overrides reach the recipe's data; a checkpoint alone uses the recipe saved beside it.
    fewer = _eval(recipe, "data.eval_batches=1", "--output", out, "--batch-size", 4)
    assert fewer.exit_code == 0, fewer.output
    assert json.loads(out.read_text())["sets"][0]["batches"] == 1
    alone = _eval(runs / "teacher-sft", "--output", out, "--batch-size", 4)
    assert alone.exit_code == 0, alone.output
    (row,) = json.loads(out.read_text())["models"]
    assert row["text_loss"] == pytest.approx(report["models"][0]["text_loss"], rel=1e-9)


def test_eval_recipe_scores_each_held_out_document_once(tmp_path):
    """--batches past the end of a file-backed eval split stops there (training's reader
    would start the file over) and says how much was scored."""
    rows = tmp_path / "docs.jsonl"
    rows.write_text("".join(json.dumps({"text": f"kiza pa povo vo {i} zafi zi"}) + "\n"
                            for i in range(40)))
    data = {"seq_len": 32, "eval_fraction": 0.1, "eval_batches": 2,
            "sources": [{"files": [str(rows)]}]}
    recipe = small_recipe(tmp_path, data=data)
    assert runner.invoke(app, ["convert", recipe]).exit_code == 0
    out = tmp_path / "r.json"
    result = _eval(recipe, "--batches", 50, "--batch-size", 2, "--output", out)
    assert result.exit_code == 0, result.output
    text = json.loads(out.read_text())["sets"][0]
    assert (text["documents"], text["complete"]) == (4, True)  # rows 0, 10, 20, 30 held out
    assert text["batches"] < 50
    shown = " ".join(result.output.split())
    assert f"small: data (eval split), all 4 documents, {text['tokens']:,} scored tokens" in shown
    assert f"holds 4 documents, {text['batches']} of the 50 batches asked for" in shown


def test_eval_recipe_includes_its_gguf_export(tmp_path):
    require_llamacpp()
    recipe, runs = _recipe_run(tmp_path)
    exported = runner.invoke(app, ["export-gguf", str(runs / "convert" / "final"), "--type",
                                   "f16", "--output", str(runs / "small-f16.gguf"),
                                   "--no-validate"])
    assert exported.exit_code == 0, exported.output
    out = tmp_path / "r.json"
    result = _eval(recipe, "--output", out)
    assert result.exit_code == 0, result.output
    teacher, student, gguf = json.loads(out.read_text())["models"]
    assert gguf["model"] == "GGUF small-f16.gguf" and gguf["weights"] == "F16"
    assert gguf["text_tokens"] == student["text_tokens"]
    assert abs(gguf["text_loss"] - student["text_loss"]) < 5e-3
    assert "GGUF small-f16.gguf" in result.output


def _fails(result, *phrases):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    for phrase in phrases:
        assert phrase in text, text


def test_bad_sources_are_named(tmp_path, student_dir):
    _fails(_eval(tmp_path / "nope.gguf"), "no such GGUF file")
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    _fails(_eval(csv), "cannot evaluate a .csv file")
    _fails(_eval(tmp_path), "not a model directory")
    _fails(_eval("tinyy"), "not a .gguf file, a model directory", "did you mean 'tiny'")
    _fails(_eval(student_dir, "data.seq_len=8"), "applies to a recipe")
    _fails(_eval(student_dir), "no held-out data", "--text FILE")
    _fails(_eval(student_dir, "--text", tmp_path / "missing.txt"), "no such file")
    _fails(_eval(small_recipe(tmp_path)), "has produced no model yet", "wft pipeline small")
    _fails(_eval(student_dir, "--device", "gpu0", "--text", csv), "not a torch device")


def test_a_bad_device_is_refused_even_for_models_a_recipe_scan_found(tmp_path):
    """Models found by a recipe scan are skipped with a note when they cannot run; a typo in
    --device is not theirs, and must not skip them all into an empty table."""
    recipe, _ = _recipe_run(tmp_path)
    _fails(_eval(recipe, "--device", "cdua"), "--device cdua: not a torch device")


def test_nothing_evaluated_is_an_error_not_an_empty_table(tmp_path):
    recipe = small_recipe(tmp_path)
    broken = tmp_path / "runs" / "small" / "convert" / "final"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")  # found by the scan, cannot be loaded
    _fails(_eval(recipe), "no model could be evaluated", "student after convert: skipped",
           "cannot load")


def test_an_unwritable_output_is_refused_before_any_model_runs(tmp_path, student_dir,
                                                               text_file, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("run_eval ran although --output cannot be written")

    monkeypatch.setattr("wftool.commands.evaluate.run_eval", no_work)
    _fails(_eval(student_dir, "--text", text_file, "--output", tmp_path),
           f"--output {tmp_path} is a directory", "eval.json")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    _fails(_eval(student_dir, "--text", text_file, "--output", a_file / "sub" / "r.json"),
           f"{a_file} is a file")


def test_a_failed_write_names_the_output_file(tmp_path, student_dir, text_file, monkeypatch):
    """The output was writable when checked, and is not by the end of the run."""
    from wftool.commands.evaluate import EvalReport

    out = tmp_path / "r.json"

    def run_eval(*args, **kwargs):
        out.mkdir()  # something else took the name meanwhile
        return EvalReport([], [], [])

    monkeypatch.setattr("wftool.commands.evaluate.run_eval", run_eval)
    _fails(_eval(student_dir, "--text", text_file, "--output", out), f"cannot write {out}",
           "pass another --output")


def test_missing_optional_packages_say_how_to_install(tmp_path, student_dir, text_file,
                                                      monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    _fails(_eval(gguf, "--text", text_file), "needs llama-cpp-python", "wftool[llamacpp]")
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    _fails(_eval(student_dir, "--lm-eval", "hellaswag"), "lm-eval-harness", "pip install lm-eval")


def test_out_of_memory_names_the_options_to_lower(student_dir, text_file, monkeypatch):
    import torch

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("wftool.train.evaluation.evaluate_model", out_of_memory)
    _fails(_eval(student_dir, "--text", text_file, "--batch-size", 64), "out of memory",
           "batch size 64", "lower --batch-size or --seq-len")


def test_a_broken_gguf_is_refused_clearly(tmp_path, text_file):
    require_llamacpp()
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    _fails(_eval(gguf, "--text", text_file), "llama.cpp cannot load")


def test_an_unavailable_device_is_refused_before_any_model_runs(student_dir, text_file,
                                                                 monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    _fails(_eval(student_dir, "--text", text_file, "--device", "cuda"),
           "--device cuda: no CUDA GPU is visible to PyTorch", "available here: cpu",
           "use --device cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # one GPU, not four
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _fails(_eval(student_dir, "--text", text_file, "--device", "cuda:3"),
           "--device cuda:3: PyTorch sees only 1 cuda device", "cpu, cuda:0")


def test_lm_eval_tasks_are_checked_before_any_model_runs(student_dir, tmp_path, monkeypatch):
    """A hub task offline (HF_HUB_OFFLINE=1, tests/conftest.py; empty caches, whatever this
    machine downloaded before), a misspelt task: one clear line each, and no model run."""
    import datasets
    import huggingface_hub

    require_lm_eval()

    def no_model(*args, **kwargs):
        raise AssertionError("a model ran although the lm-eval tasks cannot")

    monkeypatch.setattr("wftool.commands.evaluate._evaluate_target", no_model)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _fails(_eval(student_dir, "--lm-eval", "arc_easy"),
           "--lm-eval arc_easy: the task's data set must be downloaded from the Hugging Face "
           "Hub, which cannot be reached (HF_HUB_OFFLINE=1 is set)", "allenai/ai2_arc",
           "HF_DATASETS_CACHE", "dataset_path is local")
    _fails(_eval(student_dir, "--lm-eval", "hellaswg"), "--lm-eval hellaswg: lm-eval has no "
           "such task; did you mean 'hellaswag'", "lm-eval ls tasks")


def test_a_local_task_whose_data_is_missing_names_the_task(student_dir, tmp_path):
    require_lm_eval()
    task = tmp_path / "gone.yaml"
    task.write_text(f"""task: wft_gone
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "missing.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
""")
    _fails(_eval(student_dir, "--lm-eval", task),
           "--lm-eval wft_gone: cannot load the task's data set", "missing.jsonl",
           "data_files must exist")


def test_a_tokenizer_without_eos_is_refused(student_dir, text_file, tmp_path):
    """Held-out text is packed with EOS between documents: a tokenizer without one (here the
    student's, its eos_token removed) is named, with the fix."""
    import shutil

    copy = tmp_path / "no-eos"
    shutil.copytree(student_dir, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("eos_token")
    config.pop("bos_token", None)  # the synthetic tokenizer's BOS is the same token
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    _fails(_eval(copy, "--text", text_file), f"tokenizer {copy} has no EOS token",
           "set `eos_token` in its tokenizer_config.json")
