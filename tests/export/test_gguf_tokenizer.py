"""Tokenizer metadata of a GGUF: which pre-tokenizer llama.cpp must use, what it cannot
represent, the vocabulary padded to the embedding table, and whether BOS is added. Tokenizers
of other structures are built offline with the `tokenizers` library."""

from hashlib import sha256

import pytest

from tests.conftest import require_llamacpp, tiny_llama
from wftool.data.synthetic import SyntheticLanguage
from wftool.export import gguf_tokenizer
from wftool.export.gguf_target import plan_gguf_export
from wftool.export.gguf_tokenizer import (
    CHKTXT,
    LLAMA3_SPLIT,
    adds_special_tokens,
    chkhsh,
    tokenizer_blockers,
)
from wftool.export.gguf_writer import write_gguf
from wftool.model.families import FAMILIES
from wftool.model.surgery import convert_to_bitnet
from wftool.model.tokenizer import train_synthetic_tokenizer

FAMILY = FAMILIES["llama"]
# Text with digits, contractions, newlines and non-Latin letters, so the merges cover them.
EXTRA = ["I'll say 12345 and 2024 words, isn't it?\n\n  We'Ve been there: 3.14 or 3...3.",
         "нещо на Български, 我想在apple工作 ------======= ''''```"]


def _bpe(pre_tokenizer, vocab_size=500, special=("<|begin_of_text|>", "<|end_of_text|>"),
         bos=True, **bpe):
    """A BPE tokenizer trained on the synthetic language with the given pre-tokenizer."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(**bpe))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # llama.cpp's test text in the corpus: merges inside its numbers and contractions make
    # tokens depend on exactly where the pre-tokenizer splits.
    corpus = SyntheticLanguage().documents(300, seed=1) + EXTRA + [CHKTXT] * 20
    backend.train_from_iterator(corpus, trainer)
    if bos:  # as Llama 3's post-processor does
        bos_id = backend.token_to_id(special[0])
        backend.post_processor = processors.TemplateProcessing(
            single=f"{special[0]} $A", special_tokens=[(special[0], bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=special[0],
                                   eos_token=special[1])


def llama3_style_tokenizer():
    """Llama 3's pre-tokenizer (its split regex, then bytes) and BOS, on a small vocabulary."""
    from tokenizers import Regex, pre_tokenizers

    return _bpe(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]), ignore_merges=True)


@pytest.fixture(scope="module")
def synthetic():
    return train_synthetic_tokenizer(512)


def _pre(tokenizer):
    return gguf_tokenizer._pre_tokenizer(tokenizer)


def test_chkhsh_is_llamacpps_fingerprint(synthetic):
    assert len(CHKTXT) == 350 and "\u200d" in CHKTXT and CHKTXT.endswith("We'Ve a'lL")
    assert chkhsh(synthetic) == sha256(str(synthetic.encode(CHKTXT)).encode()).hexdigest()


def test_wfts_synthetic_tokenizer_is_gpt_2_and_adds_no_bos(synthetic):
    # Its ByteLevel pre-tokenizer applies GPT-2's regex: llama.cpp's `gpt-2` split.
    assert _pre(synthetic) == ("gpt-2", None)
    assert adds_special_tokens(synthetic) == (False, False)


def test_a_llama_3_style_tokenizer_is_llama_bpe_and_adds_bos():
    tokenizer = llama3_style_tokenizer()
    assert _pre(tokenizer) == ("llama-bpe", None)
    assert adds_special_tokens(tokenizer) == (True, False)


def test_a_known_hash_names_the_pre_tokenizer(synthetic, monkeypatch):
    # convert_hf_to_gguf.py's table decides first, as it does there.
    monkeypatch.setitem(gguf_tokenizer.KNOWN_PRE_HASHES, chkhsh(synthetic), "smollm")
    assert _pre(synthetic) == ("smollm", None)
    assert gguf_tokenizer.KNOWN_PRE_HASHES[
        "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454"] == "gpt-2"


def test_an_unknown_pre_tokenizer_is_refused_naming_its_hash():
    from tokenizers import Regex, pre_tokenizers

    tokenizer = _bpe(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d+|\D+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]))
    [(reason, fix)] = tokenizer_blockers(tokenizer, 512)
    assert f"chkhsh {chkhsh(tokenizer)}" in reason
    assert "KNOWN_PRE_HASHES" in fix and "wft serve --backend torch" in fix


def test_llama_3s_split_without_its_ignore_merges_is_not_taken_for_llama_bpe():
    # llama.cpp's llama-bpe skips merges for whole words in the vocabulary; a tokenizer that
    # does not would tokenize differently there.
    from tokenizers import Regex, pre_tokenizers

    tokenizer = _bpe(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]))
    assert _pre(tokenizer)[0] is None


def test_sentencepiece_style_and_non_bpe_tokenizers_are_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    metaspace = _bpe(pre_tokenizers.Metaspace(), bos=False)  # Mistral 7B, TinyLlama
    [(reason, fix)] = tokenizer_blockers(metaspace, 512)
    assert "SentencePiece-style" in reason and "Mistral" in reason
    assert "byte-level BPE" in fix and "wft serve --backend torch" in fix
    fallback = _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), bos=False,
                    byte_fallback=True)
    assert "SentencePiece-style" in tokenizer_blockers(fallback, 512)[0][0]
    words = _bpe(pre_tokenizers.Whitespace(), bos=False)
    assert "not byte-level" in tokenizer_blockers(words, 512)[0][0]
    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("\u2581a", -1.0), ("a", -2.0)], 0))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram = PreTrainedTokenizerFast(tokenizer_object=unigram, unk_token="<unk>")
    assert "tokenizer model Unigram" in tokenizer_blockers(unigram, 512)[0][0]


def test_a_tokenizer_longer_than_the_embedding_table_is_refused(synthetic):
    [(reason, fix)] = tokenizer_blockers(synthetic, 256)
    assert "512 tokens (ids up to 511)" in reason and "256 rows" in reason
    assert "the tokenizer it was trained with" in fix
    assert tokenizer_blockers(synthetic, 1024) == []  # shorter: padded when written


def test_the_plan_reports_tokenizer_blockers_before_anything_is_written(synthetic):
    model = tiny_llama(vocab_size=256, hidden_size=256, intermediate_size=512)
    convert_to_bitnet(model, FAMILY, "paper")
    _, problems = plan_gguf_export(model, FAMILY, "paper", 1.0, "tq2_0", synthetic)
    assert any("256 rows" in b.reason for b in problems)


def _gguf_tokenizer_fields(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = reader.fields

    def text(key):
        return bytes(fields[key].parts[-1]).decode()

    tokens = [bytes(fields["tokenizer.ggml.tokens"].parts[i]).decode()
              for i in fields["tokenizer.ggml.tokens"].data]
    types = [int(fields["tokenizer.ggml.token_type"].parts[i][0])
             for i in fields["tokenizer.ggml.token_type"].data]
    return text("tokenizer.ggml.pre"), tokens, types, bool(
        fields["tokenizer.ggml.add_bos_token"].parts[-1][0])


def _write(tmp_path, tokenizer, vocab_size=512):
    model = tiny_llama(vocab_size=vocab_size, hidden_size=256, intermediate_size=512)
    convert_to_bitnet(model, FAMILY, "paper")
    target, problems = plan_gguf_export(model, FAMILY, "paper", 1.0, "f16", tokenizer)
    assert problems == []
    path = tmp_path / "m.gguf"
    write_gguf(model, tokenizer, FAMILY, target, path)
    return model, path


def test_a_shorter_tokenizer_is_padded_with_unused_tokens(tmp_path):
    from gguf import TokenType

    tokenizer = llama3_style_tokenizer()
    assert len(tokenizer) < 512
    _, path = _write(tmp_path, tokenizer)
    pre, tokens, types, add_bos = _gguf_tokenizer_fields(path)
    assert pre == "llama-bpe" and add_bos
    assert len(tokens) == len(types) == 512  # one per token_embd row
    assert tokens[len(tokenizer):] == [f"[PAD{i}]" for i in range(len(tokenizer), 512)]
    assert set(types[len(tokenizer):]) == {TokenType.UNUSED}
    assert tokens[0] == "<|begin_of_text|>" and types[0] == TokenType.CONTROL


def test_llamacpp_tokenizes_a_llama_3_style_export_like_the_tokenizer(tmp_path):
    require_llamacpp()
    from wftool.export.validate import compare_with_llamacpp

    tokenizer = llama3_style_tokenizer()
    model, path = _write(tmp_path, tokenizer)
    prompts = ["I'll say 12345 and 2024 words,\n\n isn't it?", EXTRA[1]]
    stats = compare_with_llamacpp(path, model, tokenizer, "f16", prompts=prompts)
    # CHKTXT included: the pre-tokenizer matches; BOS added by both.
    assert stats["problems"] == []


def test_llamacpp_notices_a_wrong_pre_tokenizer(tmp_path, monkeypatch):
    require_llamacpp()
    from wftool.export.validate import compare_with_llamacpp

    tokenizer = llama3_style_tokenizer()
    monkeypatch.setitem(gguf_tokenizer.KNOWN_PRE_HASHES, chkhsh(tokenizer), "gpt-2")
    model, path = _write(tmp_path, tokenizer)
    stats = compare_with_llamacpp(path, model, tokenizer, "f16", prompts=["I'll say 12345"])
    assert any("pre-tokenizer test text" in p for p in stats["problems"])
