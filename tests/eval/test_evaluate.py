"""`wft eval` numbers equal a direct computation: plain cross-entropy on each document and
example run alone through the model (no packing, no padding)."""

import sys

import torch
from rich.console import Console

from tests.eval.conftest import (
    assert_matches,
    make_student,
    reference_numbers,
    require_lm_eval,
    same_batch_numbers,
)
from wftool.commands.evaluate import EvalOptions, lm_eval_available, run_eval
from wftool.model.checkpoint import load_model_dir
from wftool.model.surgery import set_quant_mix

quiet = Console(quiet=True)


def test_student_and_teacher_numbers_equal_a_direct_computation(
        student_dir, teacher_dir, text_file, task_file):
    """The teacher against the direct computation; the student, whose int8 activations make
    any other batching round differently, on the same batches (tests/eval/conftest.py)."""
    options = EvalOptions(text=text_file, task=task_file, seq_len=48, batch_size=3)
    report = run_eval([str(teacher_dir), str(student_dir)], options, quiet)
    teacher_row, student_row = report.models
    assert (teacher_row["weights"], student_row["weights"]) == ("FP (float32)", "ternary")
    for row, path in ((teacher_row, teacher_dir), (student_row, student_dir)):
        expected = reference_numbers(path, text_file, task_file, 48, batch_size=3)
        assert_matches(row, expected)
    # Non-trivial data: several packed rows, a partial last row, some answers right.
    assert expected["text_tokens"] > 3 * 48
    task = expected["task"]  # some answers right, some wrong
    assert 0 < task.sure_right < task.judged - task.close
    assert [s["tokens"] for s in report.sets] == [expected["text_tokens"],
                                                 expected["task_tokens"]]


def test_student_is_scored_with_its_quantized_forward_at_the_saved_mix(
        tokenizer, tmp_path, text_file, task_file):
    """A student saved mid warm-up (mix 0.5) is scored exactly as it was trained: ternary
    blend at 0.5 and int8 activations, not its latent weights nor a full ternary forward."""
    path = make_student(tokenizer, tmp_path / "warm", quant_mix=0.5)
    options = EvalOptions(text=text_file, task=task_file, seq_len=48, batch_size=4)
    (row,) = run_eval([str(path)], options, quiet).models
    assert row["weights"] == "ternary, mix 0.50"
    model, tokenizer, meta = load_model_dir(path)
    assert meta.quant_mix == 0.5

    def at_mix(mix):  # set here, so a loader that ignored the saved mix would show
        set_quant_mix(model, mix)
        return same_batch_numbers(model, tokenizer, text_file, task_file, 48, batch_size=4)

    assert_matches(row, at_mix(0.5))
    # The same batches at mix 0 (latent weights) and 1 (fully ternary) move both losses by
    # 8e-3 to 1e-1 here: at least 100 times the tolerance assert_matches allows.
    for other in (at_mix(0.0), at_mix(1.0)):
        for key in ("text_loss", "task_loss"):
            assert abs(other[key] - row[key]) > 100 * other["tolerance"], key


def test_batches_option_bounds_the_work(student_dir, text_file, task_file):
    options = EvalOptions(text=text_file, task=task_file, seq_len=16, batch_size=2, batches=2)
    report = run_eval([str(student_dir)], options, quiet)
    text, task = report.sets
    assert text["batches"] == task["batches"] == 2
    assert text["tokens"] == 2 * 2 * 15 and task["examples"] == 4
    (row,) = report.models
    assert row["text_tokens"] == text["tokens"]


def _recipe_with(tmp_path, student_dir, **sections):
    """A recipe whose only run output is a converted student (`student_dir`)."""
    import yaml

    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = tmp_path / "named.yaml"
    recipe.write_text(yaml.safe_dump({"name": "named", "output_dir": str(tmp_path / "runs"),
                                      **sections}))
    converted = tmp_path / "runs" / "named" / "convert" / "final"
    converted.parent.mkdir(parents=True)
    converted.symlink_to(student_dir)  # stands in for `wft convert`'s output
    return str(recipe)


def test_recipe_original_model_is_loaded_from_the_recipe_model_section(
        teacher_dir, student_dir, tmp_path, text_file):
    """The model a recipe names is loaded as training loads it: the recipe's dtype (and
    revision and tokenizer) apply, not whatever the directory holds."""
    from wftool.eval.targets import recipe_targets
    from wftool.recipe.load import load_recipe

    recipe = _recipe_with(tmp_path, student_dir,
                          model={"name_or_path": str(teacher_dir), "dtype": "bfloat16"})
    original = recipe_targets(load_recipe(recipe))[0]
    assert original.label == "original model (FP)"
    assert original.spec == load_recipe(recipe).model
    options = EvalOptions(text=text_file, seq_len=48, batch_size=3)
    named, student = run_eval([recipe], options, quiet).models
    assert (named["model"], named["weights"]) == ("original model (FP)", "FP (bfloat16)")
    assert student["weights"] == "ternary"


def test_recipe_teacher_directory_is_loaded_in_the_teacher_dtype(
        teacher_dir, student_dir, tmp_path, text_file):
    """`teacher.dtype` applies to a teacher directory as in distill (`load_teacher`), and a
    ternary directory is no teacher there either."""
    recipe = _recipe_with(tmp_path, student_dir, model={"name_or_path": str(teacher_dir)},
                          teacher={"name_or_path": str(teacher_dir), "dtype": "bfloat16"})
    options = EvalOptions(text=text_file, seq_len=48, batch_size=3)
    teacher, _ = run_eval([recipe], options, quiet).models
    assert (teacher["model"], teacher["weights"]) == ("teacher", "FP (bfloat16)")
    ternary = _recipe_with(tmp_path / "t", student_dir, model={"name_or_path": str(teacher_dir)},
                           teacher={"name_or_path": str(student_dir)})
    report = run_eval([ternary], options, quiet)
    assert [row["model"] for row in report.models] == ["student after convert"]
    assert "teacher: skipped" in report.notes[0] and "full precision" in report.notes[0]


def test_a_skipped_model_is_not_the_tokenizer_reference(
        teacher_dir, student_dir, tmp_path, text_file, monkeypatch):
    """The first model a recipe names runs out of memory and is skipped: the student (another
    tokenizer) is compared with nobody, and the set is described by the student's tokens."""
    from wftool.model.checkpoint import save_model_dir
    from wftool.model.tokenizer import train_synthetic_tokenizer
    from wftool.train import evaluation

    model, _, _ = load_model_dir(teacher_dir)
    other = train_synthetic_tokenizer(512, n_documents=300)  # same size, other merges
    original = save_model_dir(model, other, tmp_path / "other-tokenizer")
    recipe = _recipe_with(tmp_path, student_dir, model={"name_or_path": str(original)})
    real = evaluation.evaluate_model

    def out_of_memory_on_the_original(model, *args, **kwargs):
        if model.config._name_or_path == str(original):
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_model", out_of_memory_on_the_original)
    options = EvalOptions(text=text_file, seq_len=48, batch_size=3)
    report = run_eval([recipe], options, quiet)
    (row,) = report.models
    assert row["model"] == "student after convert"
    assert report.notes[0].startswith("original model (FP): skipped (original model (FP): out "
                                      "of memory")
    assert report.sets[0]["tokens"] == row["text_tokens"]


def test_lm_eval_presence_is_checked_without_importing_it(monkeypatch):
    require_lm_eval()
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    assert lm_eval_available()
    assert "lm_eval" not in sys.modules
