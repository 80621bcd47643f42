"""The README's tiny-pipeline numbers are generated from a stored real run of the current
recipe, and the check `make demo` runs tells noise from a changed result."""

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from wftool.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("readme_numbers",
                                                  ROOT / "docs" / "readme_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def numbers():
    return _script()


@pytest.fixture(scope="module")
def reference(numbers):
    return json.loads(numbers.REFERENCE.read_text())


def test_readme_blocks_are_what_the_stored_run_renders(numbers, reference):
    readme = numbers.README.read_text()
    assert numbers.render_readme(readme, reference) == readme, (
        "README.md's generated blocks differ from docs/tiny/pipeline.json: "
        "run python docs/readme_numbers.py update runs/tiny after a fresh run")
    assert numbers.CURVES.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](docs/tiny/curves.png)" in readme


def test_the_stored_run_used_the_current_tiny_recipe(numbers, reference):
    assert numbers.recipe_drift(reference, load_recipe("tiny")) == []


def test_recipe_drift_names_the_changed_field(numbers, reference):
    changed = load_recipe("tiny", ["distill.training.max_steps=11"])
    drift = numbers.recipe_drift(reference, changed)
    assert drift == ["distill.training.max_steps: 10 in the README's run, 11 now"]
    # A stage the run does not have cannot change its numbers.
    assert numbers.recipe_drift(reference, load_recipe("tiny", ["unified.block_size=4"])) == []


def test_check_accepts_noise_and_flags_a_changed_result(numbers, reference):
    rows = reference["rows"]
    assert numbers.differences(rows, rows) == []
    noisy = copy.deepcopy(rows)
    for row in noisy:
        row["text_loss"] += 0.02
        if row.get("task_accuracy") is not None:
            row["task_accuracy"] -= 1 / row["examples"]  # one example
    assert numbers.differences(rows, noisy) == []
    worse = copy.deepcopy(rows)
    student = next(r for r in worse if r["model"] == "BitDistill student")
    student["text_loss"] += 0.3
    found = numbers.differences(rows, worse)
    assert len(found) == 1 and found[0].startswith("BitDistill student: text_loss")
    del worse[0]
    assert f"{rows[0]['model']}: missing from the fresh run" in numbers.differences(rows, worse)
