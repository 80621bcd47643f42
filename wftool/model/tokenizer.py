"""Tokenizers: a model's own from the hub, or a byte-level BPE trained on synthetic text.

The synthetic one is the GPT-2 style byte-level BPE that llama.cpp's `gpt2` tokenizer model
reads, so a tiny model built from a config can go all the way to a GGUF file.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from wftool.data.packing import require_eos
from wftool.data.synthetic import WordClassTask, SyntheticLanguage
from wftool.errors import WftError

SYNTHETIC = "synthetic"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# A minimal ChatML template so chat endpoints work on models trained here.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, "<|im_start|>", "<|im_end|>")
# Byte-level BPE always holds the 256 bytes and the special tokens, whatever vocab_size says.
MIN_SYNTHETIC_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_synthetic_tokenizer(
    vocab_size: int, language: SyntheticLanguage | None = None, n_documents: int = 2000
) -> PreTrainedTokenizerFast:
    """A byte-level BPE of exactly ``vocab_size`` tokens trained on the synthetic language."""
    if vocab_size < MIN_SYNTHETIC_VOCAB:
        raise WftError(
            f"the synthetic tokenizer needs at least {MIN_SYNTHETIC_VOCAB} tokens (256 bytes + "
            f"{len(SPECIAL_TOKENS)} special tokens); the model has vocab_size {vocab_size}",
            f"set model.config.vocab_size={MIN_SYNTHETIC_VOCAB} or more")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    language = language or SyntheticLanguage()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Task prompts and labels are in the corpus so that " ->", " left", " right" are tokens.
    task = WordClassTask()
    examples = ["".join(task.example(12345, i)) for i in range(n_documents // 10)]
    backend.train_from_iterator(language.documents(n_documents, seed=12345) + examples, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1 << 20,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    # A small language runs out of merges early: reserved tokens fill the vocabulary so the
    # tokenizer and the embedding table have the same size, as llama.cpp requires.
    missing = vocab_size - len(tokenizer)
    if missing > 0:
        tokenizer.add_tokens([f"<|reserved_{i}|>" for i in range(missing)], special_tokens=True)
    return tokenizer


def load_tokenizer(source: str, vocab_size: int, revision: str | None = None,
                   gguf_file: str | None = None):
    """``synthetic`` trains one for ``vocab_size``; anything else is a hub id or directory
    (with ``gguf_file``: the tokenizer and chat template stored in that GGUF file).

    A tokenizer without an EOS token (or with one past the model's ``vocab_size``) is
    refused here, before any stage runs: packing ends every document and task answer with EOS.
    """
    if source == SYNTHETIC:
        tokenizer = train_synthetic_tokenizer(vocab_size)
        if len(tokenizer) > vocab_size:  # token ids past the embeddings: wrong, not slow
            raise WftError(f"the synthetic tokenizer has {len(tokenizer)} tokens, more than the "
                           f"model's vocab_size {vocab_size}",
                           f"set model.config.vocab_size={len(tokenizer)} or more")
        return tokenizer
    from transformers import AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, **extra)
    require_eos(tokenizer, source, vocab_size)
    return tokenizer
