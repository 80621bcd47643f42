"""Q-Sparse from the recipe: the warm-up ramp, the sparsity a student is saved and served
with, and GGUF export, which runs dense."""

import pytest

from wftool.commands.convert import run_convert
from wftool.commands.export import run_export
from wftool.model.checkpoint import load_model_dir, read_metadata
from wftool.quant.q_sparse import current_q_sparsity
from wftool.quant.ternary_linear import TernaryLinear, pack_ternary_layers
from wftool.recipe import load_recipe
from wftool.train.hooks import QSparseWarmup
from wftool.train.metrics import read_metrics
from wftool.train.stages import run_pretrain

from tests.conftest import require_llamacpp, tiny_llama_student


def test_the_warmup_ramps_in_levels_to_the_target():
    hook = QSparseWarmup(tiny_llama_student("paper"), 0.6, steps=10)
    values = [hook.sparsity_at(step) for step in range(12)]
    assert values[0] == 0.0 and values[9] == values[11] == 0.6
    assert values[2] == pytest.approx(0.6 * 0.25)  # 3 of 10 steps done: the first level
    assert values == sorted(values)
    assert len(set(values)) <= QSparseWarmup.LEVELS + 1
    assert QSparseWarmup(tiny_llama_student("paper"), 0.6, steps=0).sparsity_at(0) == 0.6


def test_a_sparse_student_is_saved_served_and_exported_dense(recipe_file):
    recipe = load_recipe(recipe_file, ["quantization.q_sparsity=0.5",
                                       "quantization.q_sparse_warmup_steps=4"])
    run_convert(recipe)
    result = run_pretrain(recipe)
    logged = [entry["q_sparsity"] for entry in read_metrics(
        result.final_dir.parent / "metrics.jsonl")]
    assert logged[0] < 0.5 and logged[-1] == 0.5
    assert read_metadata(result.final_dir).q_sparsity == 0.5
    model, _, _ = load_model_dir(result.final_dir)
    assert current_q_sparsity(model) == 0.5
    pack_ternary_layers(model)
    assert all(m.sparsity == 0.5 for m in model.modules() if isinstance(m, TernaryLinear))
    require_llamacpp()
    # llama.cpp multiplies dense activations: the export checks it against the dense forward.
    exported = run_export(result.final_dir, "f16", result.final_dir.parent / "s.gguf", True, "s")
    assert exported.llamacpp is not None and not exported.problems
    assert any(row == "Q-Sparse" for row, _ in exported.notes)
