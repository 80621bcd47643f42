"""A Hugging Face tokenizer as the metadata of llama.cpp's `gpt2` (byte-level BPE) tokenizer.

llama.cpp re-implements each family's pre-tokenizer (the split before BPE) and picks one by the
name in `tokenizer.ggml.pre`. Its converter (convert_hf_to_gguf.py, `get_vocab_base_pre`)
finds that name by tokenizing a fixed text, CHKTXT, and looking the sha256 of the token ids up
in a table of tokenizers it knows; wft does the same. A tokenizer made with the `tokenizers`
library (wft's synthetic one) has a hash of its own, since the ids depend on the vocabulary,
so wft also recognises, from tokenizer.json, the pre-tokenizers llama.cpp's `gpt-2`, `smollm`
and `llama-bpe` implement exactly. Anything else is refused before writing, as llama.cpp's
converter refuses it: a wrong pre-tokenizer splits text differently and degrades the model
without any error.
"""

from __future__ import annotations

import json
from hashlib import sha256

from wftool.errors import WftError

# convert_hf_to_gguf.py's `chktxt`, character for character (checked: the real GPT-2 vocabulary
# hashes to the table's gpt-2 entry below).
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# sha256(str(tokenizer.encode(CHKTXT))) -> tokenizer.ggml.pre, from convert_hf_to_gguf.py's
# table: the entries of the model families wft converts.
KNOWN_PRE_HASHES = {
    # openai-community/gpt2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    # meta-llama/Meta-Llama-3-8B
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    # HuggingFaceTB/SmolLM-135M (SmolLM2 has the same tokenizer)
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    # Qwen/Qwen1.5-7B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    # Qwen/Qwen3-Embedding-0.6B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
}
# Llama 3's split regex as its tokenizer.json has it (llama.cpp's LLAMA3 pre-tokenizer).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.json pre-tokenizer steps (see _step) -> the llama.cpp pre-tokenizer that splits
# text the same way, and whether its BPE must use `ignore_merges` (llama.cpp sets it for
# llama-bpe only). ByteLevel with use_regex applies the GPT-2 regex, which is llama.cpp's
# gpt-2 split.
_GPT2 = ("ByteLevel", False, True)
KNOWN_PRE_STRUCTURES = {
    (_GPT2,): ("gpt-2", False),
    (("Digits", True), _GPT2): ("smollm", False),
    (("Split", LLAMA3_SPLIT, "Isolated", False), ("ByteLevel", False, False)):
        ("llama-bpe", True),
}
BYTE_LEVEL_FIX = ("export students of a model with a byte-level BPE tokenizer (GPT-2, Llama 3, "
                  "SmolLM2, Qwen), or serve this one with `wft serve --backend torch`")


def chkhsh(tokenizer) -> str:
    """convert_hf_to_gguf.py's pre-tokenizer fingerprint: sha256 of str(token ids of
    CHKTXT), special tokens included as the tokenizer adds them."""
    return sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()


def tokenizer_blockers(tokenizer, vocab_size: int) -> list[tuple[str, str]]:
    """(reason, fix) for everything that keeps `tokenizer` from an exact llama.cpp `gpt2`
    tokenizer over an embedding table of `vocab_size` rows (empty when it fits)."""
    problems = []
    ids = tokenizer.get_vocab().values()
    if ids and max(ids) >= vocab_size:
        reason = (f"the tokenizer has {len(tokenizer)} tokens (ids up to {max(ids)}) but "
                  f"token_embd has {vocab_size} rows")
        fix = ("export the model with the tokenizer it was trained with (every id below "
               "config.vocab_size)")
        problems.append((reason, fix))
    _, problem = _pre_tokenizer(tokenizer)
    return problems + ([problem] if problem else [])


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The tokenizer keys of a GGUF: vocab_size tokens (ids the tokenizer lacks become
    UNUSED `[PAD<i>]`, as llama.cpp's converter writes them), merges, the pre-tokenizer, the
    special ids, whether BOS/EOS are added, and the chat template."""
    from gguf import TokenType

    problems = tokenizer_blockers(tokenizer, vocab_size)
    if problems:  # plan_gguf_export reports these before anything is written
        raise WftError("; ".join(reason for reason, _ in problems), problems[0][1])
    pre, _ = _pre_tokenizer(tokenizer)
    reverse = {i: token for token, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    added = set(tokenizer.get_added_vocab().values())
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tokens.append(reverse[i])
        types.append(TokenType.CONTROL if i in special else
                     TokenType.USER_DEFINED if i in added else TokenType.NORMAL)
    merges = _backend(tokenizer)["model"].get("merges", [])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    add_bos, add_eos = adds_special_tokens(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def adds_special_tokens(tokenizer) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS before and EOS after a text of its own accord (its
    post-processor), which llama.cpp repeats when the GGUF says so."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and bool(ids) and ids[0] == bos
    add_eos = eos is not None and len(ids) > int(add_bos) + 1 and ids[-1] == eos
    return add_bos, add_eos


def _backend(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _pre_tokenizer(tokenizer) -> tuple[str | None, tuple[str, str] | None]:
    """(tokenizer.ggml.pre, None), or (None, (reason, fix)) where llama.cpp's gpt2 tokenizer
    cannot reproduce the tokenizer."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        return None, (("the tokenizer is not a fast (tokenizer.json) tokenizer, so its "
                       "pre-tokenizer cannot be identified"), BYTE_LEVEL_FIX)
    backend = _backend(tokenizer)
    model = backend["model"]
    steps = _steps(backend.get("pre_tokenizer"))
    normalizers = _steps(backend.get("normalizer"))
    if model.get("type") != "BPE":
        return None, ((f"tokenizer model {model.get('type')}: llama.cpp's gpt2 tokenizer "
                       "model reads byte-level BPE only"), BYTE_LEVEL_FIX)
    if (model.get("byte_fallback") or any(s.get("type") == "Metaspace" for s in steps)
            or any(s.get("type") in ("Prepend", "Replace") for s in normalizers)):
        return None, (("SentencePiece-style BPE (Metaspace / byte fallback, as in Mistral 7B, "
                       "Llama 2 and TinyLlama): llama.cpp reads it as its `llama` (SPM) "
                       "tokenizer model, which wft does not write"), BYTE_LEVEL_FIX)
    if not any(s.get("type") == "ByteLevel" for s in steps):
        return None, (("the BPE tokenizer is not byte-level (no ByteLevel pre-tokenizer): "
                       "llama.cpp's gpt2 tokenizer model maps bytes as GPT-2 does"), BYTE_LEVEL_FIX)
    digest = chkhsh(tokenizer)
    if digest in KNOWN_PRE_HASHES:
        return KNOWN_PRE_HASHES[digest], None
    known = KNOWN_PRE_STRUCTURES.get(tuple(_step(s) for s in steps))
    if known and not normalizers and bool(model.get("ignore_merges")) == known[1]:
        return known[0], None
    reason = (f"llama.cpp's converter does not know this BPE pre-tokenizer (chkhsh {digest}), "
              "so no tokenizer.ggml.pre would make llama.cpp split text as it does")
    fix = ("add the hash to KNOWN_PRE_HASHES in wftool/export/gguf_tokenizer.py once llama.cpp's "
           "convert_hf_to_gguf_update.py lists the tokenizer; until then serve the student with "
           "`wft serve --backend torch`")
    return None, (reason, fix)


def _steps(component: dict | None) -> list[dict]:
    """The steps of a tokenizer.json normalizer or pre-tokenizer, Sequences flattened."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        parts = component.get("pretokenizers") or component.get("normalizers") or []
        return [step for part in parts for step in _steps(part)]
    return [component]


def _step(step: dict) -> tuple:
    """What of a pre-tokenizer step decides the split (not offsets, which ids ignore)."""
    kind = step.get("type")
    if kind == "ByteLevel":
        return kind, bool(step.get("add_prefix_space")), bool(step.get("use_regex", True))
    if kind == "Split":
        return (kind, (step.get("pattern") or {}).get("Regex"), step.get("behavior"),
                bool(step.get("invert")))
    if kind == "Digits":
        return kind, bool(step.get("individual_digits"))
    return (kind,)
