"""`wft eval` numbers equal a direct computation: plain cross-entropy on each document and
example run alone through the model (no packing, no padding)."""

from rich.console import Console

from tests.eval.conftest import assert_matches, expected_numbers, make_student
from wftool.commands.evaluate import EvalOptions, run_eval
from wftool.model.checkpoint import load_model_dir
from wftool.model.surgery import set_quant_mix

quiet = Console(quiet=True)


def test_student_and_teacher_numbers_equal_a_direct_computation(
        student_dir, teacher_dir, text_file, task_file):
    options = EvalOptions(text=text_file, task=task_file, seq_len=48, batch_size=3)
    report = run_eval([str(teacher_dir), str(student_dir)], options, quiet)
    teacher_row, student_row = report.models
    assert (teacher_row["weights"], student_row["weights"]) == ("FP (float32)", "ternary")
    for row, path in ((teacher_row, teacher_dir), (student_row, student_dir)):
        model, tokenizer, _ = load_model_dir(path)
        expected = expected_numbers(model, tokenizer, text_file, task_file, 48)
        assert_matches(row, expected)
    # Non-trivial data: several packed rows, a partial last row, some answers right.
    assert expected["text_tokens"] > 3 * 48
    assert 0 < expected["task_accuracy"] < 1
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
    assert_matches(row, expected_numbers(model, tokenizer, text_file, task_file, 48))
    for other_mix in (0.0, 1.0):
        set_quant_mix(model, other_mix)
        other = expected_numbers(model, tokenizer, text_file, task_file, 48)
        assert abs(other["text_loss"] - row["text_loss"]) > 1e-4


def test_batches_option_bounds_the_work(student_dir, text_file, task_file):
    options = EvalOptions(text=text_file, task=task_file, seq_len=16, batch_size=2, batches=2)
    report = run_eval([str(student_dir)], options, quiet)
    text, task = report.sets
    assert text["batches"] == task["batches"] == 2
    assert text["tokens"] == 2 * 2 * 15 and task["examples"] == 4
    (row,) = report.models
    assert row["text_tokens"] == text["tokens"]


def test_recipe_original_model_is_loaded_from_the_recipe_model_section(
        teacher_dir, student_dir, tmp_path, text_file):
    """The model a recipe names is loaded as training loads it: the recipe's dtype (and
    revision and tokenizer) apply, not whatever the directory holds."""
    import yaml

    from wftool.eval.targets import recipe_targets
    from wftool.recipe.load import load_recipe

    recipe = tmp_path / "named.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "named", "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(teacher_dir), "dtype": "bfloat16"}}))
    converted = tmp_path / "runs" / "named" / "convert" / "final"
    converted.parent.mkdir(parents=True)
    converted.symlink_to(student_dir)  # stands in for `wft convert`'s output
    original = recipe_targets(load_recipe(str(recipe)))[0]
    assert original.label == "original model (FP)"
    assert original.spec == load_recipe(str(recipe)).model
    options = EvalOptions(text=text_file, seq_len=48, batch_size=3)
    named, student = run_eval([str(recipe)], options, quiet).models
    assert (named["model"], named["weights"]) == ("original model (FP)", "FP (bfloat16)")
    assert student["weights"] == "ternary"
