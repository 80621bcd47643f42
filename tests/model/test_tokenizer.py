"""`load_tokenizer`, the one place training gets its tokenizer: a tokenizer without an EOS
token (which packing puts after every document and task answer) is refused up front."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from tests.train.conftest import SMALL_MODEL
from wftool.cli import app
from wftool.errors import WftError
from wftool.model.tokenizer import EOS_TOKEN, load_tokenizer, train_synthetic_tokenizer


def _saved_tokenizer(path, **config_changes):
    """The synthetic tokenizer saved as a user's would be, tokenizer_config.json edited
    (a value of None removes the key)."""
    train_synthetic_tokenizer(512).save_pretrained(path)
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    config_file.write_text(json.dumps(config))
    return path


def test_a_tokenizer_with_eos_loads(tmp_path):
    tokenizer = load_tokenizer(str(_saved_tokenizer(tmp_path / "tok")), 512)
    assert tokenizer.eos_token == EOS_TOKEN
    assert load_tokenizer("synthetic", 512).eos_token == EOS_TOKEN


def test_a_tokenizer_without_eos_is_refused_with_the_fix(tmp_path):
    path = _saved_tokenizer(tmp_path / "tok", eos_token=None, bos_token=None)
    with pytest.raises(WftError) as caught:
        load_tokenizer(str(path), 512)
    assert caught.value.message.startswith(f"tokenizer {path} has no EOS token")
    assert "every packed document and every task answer" in caught.value.message
    assert "`eos_token` in its tokenizer_config.json" in caught.value.hint


def test_an_eos_the_vocabulary_lacks_is_refused(tmp_path):
    """transformers adds an unknown eos_token as a new token past the vocabulary: every
    packed document would then index past the model's embeddings."""
    path = _saved_tokenizer(tmp_path / "tok", eos_token="</s>")
    with pytest.raises(WftError) as caught:
        load_tokenizer(str(path), 512)
    assert "its EOS token '</s>' has id 512, past the model's 512 embeddings" in (
        caught.value.message)


def test_convert_refuses_a_recipe_tokenizer_without_eos(tmp_path):
    """Before this check `wft convert` saved the student and the first training stage then
    failed in packing with a traceback."""
    path = _saved_tokenizer(tmp_path / "tok", eos_token=None, bos_token=None)
    recipe = tmp_path / "noeos.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "noeos", "output_dir": str(tmp_path / "runs"),
        "model": {"config": SMALL_MODEL, "tokenizer": str(path), "dtype": "float32"},
        "data": {"seq_len": 32}}))
    result = CliRunner().invoke(app, ["convert", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"tokenizer {path} has no EOS token" in " ".join(result.output.split())
    assert not (tmp_path / "runs").exists()


def test_a_synthetic_vocabulary_smaller_than_its_bytes_is_refused():
    """vocab_size=100 used to convert "successfully": the tokenizer had 260 tokens, and the
    first training step indexed past the embeddings."""
    with pytest.raises(WftError) as caught:
        load_tokenizer("synthetic", 100)
    assert "at least 260 tokens" in caught.value.message
    assert caught.value.hint == "set model.config.vocab_size=260 or more"
    assert len(load_tokenizer("synthetic", 260)) == 260
