"""The unified student's mask token: a new id at the mean embedding, kept through save,
load and GGUF export (where llama.cpp reads it as one control token)."""

import pytest
import torch

from tests.conftest import require_llamacpp, tiny_llama, tiny_llama_student
from wftool.commands.export import run_export
from wftool.errors import WftError
from wftool.model.checkpoint import TernaryMetadata, load_model_dir, save_model_dir
from wftool.model.mask_token import (
    MASK_TOKEN,
    DiffusionSettings,
    add_mask_token,
    diffusion_settings,
    require_diffusion,
)
from wftool.model.tokenizer import train_synthetic_tokenizer


def test_the_mask_token_is_a_new_id_at_the_mean_embedding():
    model = tiny_llama(vocab_size=300)
    tokenizer = train_synthetic_tokenizer(300)
    before = model.get_input_embeddings().weight.detach().clone()
    mask_id = add_mask_token(model, tokenizer)
    assert mask_id == 300 and tokenizer.mask_token == MASK_TOKEN
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == 301 and model.config.vocab_size == 301
    assert torch.equal(weight[:300], before)  # no existing row changes
    assert torch.allclose(weight[mask_id], before.mean(0), atol=1e-6)
    assert model.get_output_embeddings().weight is weight  # still tied
    assert tokenizer(MASK_TOKEN, add_special_tokens=False)["input_ids"] == [mask_id]
    assert add_mask_token(model, tokenizer) == mask_id  # idempotent
    assert model.get_input_embeddings().weight.shape[0] == 301
    other = tiny_llama(vocab_size=300)  # a tokenizer that has it, a model that does not
    assert add_mask_token(other, tokenizer) == mask_id
    assert torch.allclose(other.get_input_embeddings().weight[mask_id],
                          other.get_input_embeddings().weight[:300].mean(0), atol=1e-6)


def test_a_padded_vocabulary_gives_the_mask_an_unused_row_and_untied_heads_a_mean_row():
    model = tiny_llama(vocab_size=320, tie_word_embeddings=False)  # 20 rows past the words
    tokenizer = train_synthetic_tokenizer(300)
    head = model.get_output_embeddings().weight.detach().clone()
    mask_id = add_mask_token(model, tokenizer)
    assert mask_id == 300 and model.get_input_embeddings().weight.shape[0] == 320
    assert torch.allclose(model.get_output_embeddings().weight[mask_id], head[:300].mean(0),
                          atol=1e-6)


def test_diffusion_settings_round_trip_through_a_saved_student(tmp_path):
    model = tiny_llama_student("paper", vocab_size=300)
    tokenizer = train_synthetic_tokenizer(300)
    mask_id = add_mask_token(model, tokenizer)
    settings = DiffusionSettings(mask_id, shift=True, attention="block", block_size=4)
    meta = TernaryMetadata("llama", "paper", None, stage="unified",
                           diffusion=settings.to_dict())
    save_model_dir(model, tokenizer, tmp_path / "student", meta)
    loaded, loaded_tokenizer, loaded_meta = load_model_dir(tmp_path / "student")
    assert diffusion_settings(loaded) == settings
    assert loaded_tokenizer.mask_token == MASK_TOKEN
    assert loaded_tokenizer.convert_tokens_to_ids(MASK_TOKEN) == mask_id
    x = torch.tensor([[1, 2, mask_id, 3]])
    assert torch.allclose(loaded(x).logits, model.eval()(x).logits, atol=1e-5)


def test_a_model_without_the_mask_token_is_refused_for_diffusion():
    assert diffusion_settings(tiny_llama()) is None
    with pytest.raises(WftError, match="wft unified"):
        require_diffusion(tiny_llama(), "diffusion decoding")


def test_bad_diffusion_sections_are_refused():
    with pytest.raises(ValueError, match="attention"):
        DiffusionSettings.from_dict({"mask_token_id": 3, "attention": "sideways"})
    with pytest.raises(ValueError, match="block_size"):
        DiffusionSettings.from_dict({"mask_token_id": 3, "block_size": 0})


def test_the_mask_token_survives_gguf_export_as_one_control_token(tmp_path):
    require_llamacpp()
    import gguf
    from llama_cpp import Llama

    model = tiny_llama_student("paper", vocab_size=511)  # 512 with the mask: TQ2_0 rows
    tokenizer = train_synthetic_tokenizer(511)
    mask_id = add_mask_token(model, tokenizer)
    meta = TernaryMetadata("llama", "paper", None, stage="unified",
                           diffusion=DiffusionSettings(mask_id).to_dict())
    source = save_model_dir(model, tokenizer, tmp_path / "student", meta)
    result = run_export(source, "tq2_0", tmp_path / "u.gguf", True, "u")
    assert not result.problems
    assert any(row == "decoding" and "torch runtime" in text for row, text in result.notes)
    reader = gguf.GGUFReader(tmp_path / "u.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    types = reader.fields["tokenizer.ggml.token_type"]
    assert bytes(tokens.parts[tokens.data[mask_id]]).decode() == MASK_TOKEN
    assert int(types.parts[types.data[mask_id]][0]) == gguf.TokenType.CONTROL
    llm = Llama(str(tmp_path / "u.gguf"), verbose=False, vocab_only=True)
    assert llm.tokenize(MASK_TOKEN.encode(), add_bos=False, special=True) == [mask_id]
