"""Tokenized batches: packed pre-training sequences and padded prompt/answer examples.

Packing joins documents with EOS into rows of exactly `seq_len` tokens; position ids restart
at every document (and at every row) and go to the model, which then keeps documents from
attending to each other. Task examples put the loss on answer tokens only.
"""

from __future__ import annotations

import warnings

import torch

from wftool.data.sources import DocumentMixer
from wftool.errors import WftError
from wftool.recipe.fields import MAX_BATCH_TOKENS, MAX_SEQ_LEN

IGNORE_INDEX = -100  # labels the loss skips
_TOKENIZE_CHUNK = 32
_MAX_SKIPPED_IN_A_ROW = 1000  # task examples none of which fit: seq_len is too short


def require_eos(tokenizer, name: str | None = None, vocab_size: int | None = None) -> int:
    """The tokenizer's EOS id, which packing puts between documents and after every task
    answer. A tokenizer without one is refused, named (`name`, else its own path), and so is
    an EOS outside a model's `vocab_size` embeddings (an `eos_token` the vocabulary lacks is
    added as a new token past its end)."""
    eos = tokenizer.eos_token_id
    name = name or getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    fix = ("set `eos_token` in its tokenizer_config.json to its end-of-text token (e.g. "
           "\"<|endoftext|>\" or \"</s>\"), or use a tokenizer whose special tokens include one")
    if eos is None:
        raise WftError(f"tokenizer {name} has no EOS token (eos_token is None): wft needs one "
                       "to end every packed document and every task answer", fix)
    if vocab_size is not None and eos >= vocab_size:
        raise WftError(f"tokenizer {name}: its EOS token {tokenizer.eos_token!r} has id {eos}, "
                       f"past the model's {vocab_size} embeddings (the vocabulary lacks it)",
                       "set `eos_token` in its tokenizer_config.json to an end-of-text token "
                       "of its vocabulary, or use the tokenizer the model was trained with")
    return eos


class PackedTextStream:
    """Rows of `seq_len` tokens from a document mixer; resumable through `state_dict`."""

    def __init__(self, mixer: DocumentMixer, tokenizer, seq_len: int):
        self.mixer, self.tokenizer, self.seq_len = mixer, tokenizer, seq_len
        self.eos = require_eos(tokenizer)
        self.tokens: list[int] = []
        self.positions: list[int] = []

    def _refill(self) -> None:
        docs = [self.mixer.next_document() for _ in range(_TOKENIZE_CHUNK)]
        encoded = self.tokenizer(docs, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            ids = list(ids) + [self.eos]
            self.tokens.extend(ids)
            self.positions.extend(range(len(ids)))

    def next_row(self) -> tuple[list[int], list[int]]:
        while len(self.tokens) < self.seq_len:
            self._refill()
        row, self.tokens = self.tokens[: self.seq_len], self.tokens[self.seq_len :]
        positions, self.positions = self.positions[: self.seq_len], self.positions[self.seq_len :]
        # A document cut by the row boundary continues at position 0 of the next row.
        if self.positions and self.positions[0] != 0:
            offset = self.positions[0]
            for i, p in enumerate(self.positions):
                if p < offset:
                    break
                self.positions[i] = p - offset
        return row, positions

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        check_batch_size(self.seq_len, batch_size)
        rows = [self.next_row() for _ in range(batch_size)]
        input_ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        return {
            "input_ids": input_ids,
            "position_ids": torch.tensor([r[1] for r in rows], dtype=torch.long),
            "labels": input_ids.clone(),
        }

    def state_dict(self) -> dict:
        return {"mixer": self.mixer.state_dict(), "tokens": self.tokens,
                "positions": self.positions}

    def load_state_dict(self, state: dict) -> None:
        self.mixer.load_state_dict(state["mixer"])
        self.tokens, self.positions = list(state["tokens"]), list(state["positions"])


class TaskStream:
    """Batches of prompt + answer examples, right-padded, loss on the answer only.

    An example longer than `seq_len` loses the start of its prompt; one whose answer (with
    EOS, after at least one prompt token) does not fit alone is skipped, never cut. Either
    is counted, and the first batch that had any warns once, with the fix."""

    def __init__(self, mixer: DocumentMixer, tokenizer, seq_len: int):
        self.mixer, self.tokenizer, self.seq_len = mixer, tokenizer, seq_len
        self.eos = require_eos(tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.seen = self.cut = self.skipped = self.longest = 0
        self._warned = False

    def fit(self, prompt: str, answer: str) -> tuple[list[int], list[int]] | None:
        """(ids, labels) within `seq_len`, the prompt cut from the left if it must be; None
        (counted as skipped) if the answer alone does not fit."""
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eos]
        length = len(prompt_ids) + len(answer_ids)
        self.seen += 1
        self.longest = max(self.longest, length)
        if len(answer_ids) > self.seq_len - 1:  # the first answer token needs a prompt token
            self.skipped += 1
            return None
        if length > self.seq_len:
            self.cut += 1
            prompt_ids = prompt_ids[len(prompt_ids) - (self.seq_len - len(answer_ids)):]
        return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids

    def encode(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """One row for every example (held-out scoring): as `fit`, except that an answer too
        long to fit keeps its first `seq_len - 1` tokens after one prompt token."""
        fitted = self.fit(prompt, answer)
        self.warn_if_cut()
        if fitted is not None:
            return fitted
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"][-1:]
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.eos]
        answer_ids = answer_ids[: self.seq_len - len(prompt_ids)]
        return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids

    def next_batch(self, batch_size: int) -> dict[str, torch.Tensor]:
        check_batch_size(self.seq_len, batch_size)
        examples, skipped_in_a_row = [], 0
        while len(examples) < batch_size:
            fitted = self.fit(*self.mixer.next_document())
            if fitted is not None:
                examples.append(fitted)
                skipped_in_a_row = 0
                continue
            skipped_in_a_row += 1
            if skipped_in_a_row >= _MAX_SKIPPED_IN_A_ROW:
                raise WftError(f"no task example fits data.seq_len {self.seq_len}: the last "
                               f"{skipped_in_a_row} answers alone are longer (the longest "
                               f"example is {self.longest} tokens)",
                               f"raise data.seq_len (e.g. data.seq_len={self.longest})")
        self.warn_if_cut()
        return collate_examples(examples, self.pad)

    def warn_if_cut(self) -> None:
        """Warn, once per stream, that examples were cut or skipped, and how to keep them."""
        if self._warned or not (self.cut or self.skipped):
            return
        self._warned = True
        done = []
        if self.cut:
            done.append(f"{self.cut} had the start of their prompt cut")
        if self.skipped:
            done.append(f"{self.skipped} were skipped (the answer alone does not fit)")
        warnings.warn(f"task examples longer than data.seq_len {self.seq_len} tokens (prompt + "
                      f"answer; the longest so far is {self.longest}): of {self.seen} read so "
                      f"far, {' and '.join(done)}; raise data.seq_len (e.g. data.seq_len="
                      f"{self.longest}; `wft eval --seq-len`) to keep them whole",
                      UserWarning, stacklevel=3)

    def state_dict(self) -> dict:
        return {"mixer": self.mixer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.mixer.load_state_dict(state["mixer"])


def collate_examples(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    width = max(len(ids) for ids, _ in examples)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        attention_mask[row, : len(ids)] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
    }


def model_inputs(batch: dict) -> dict:
    """The keyword arguments a Hugging Face causal LM takes for a batch.

    No KV cache: transformers keeps packed documents apart (from the position ids) only when
    no cache is passed, and training never needs one.
    """
    kept = ("input_ids", "attention_mask", "position_ids")
    inputs = {k: v for k, v in batch.items() if k in kept}
    inputs["use_cache"] = False
    return inputs


def check_batch_size(seq_len: int, batch_size: int = 1) -> None:
    """Refuse rows or batches so long that building them would run for minutes or exhaust
    memory (recipes are checked when read; eval options and copied specs come here too)."""
    if not 1 <= seq_len <= MAX_SEQ_LEN:
        raise WftError(f"seq_len {seq_len} is outside 1 to {MAX_SEQ_LEN:,} tokens",
                       "lower data.seq_len (or --seq-len)")
    if batch_size * seq_len > MAX_BATCH_TOKENS:
        raise WftError(f"a batch of {batch_size} rows of {seq_len} tokens is "
                       f"{batch_size * seq_len:,} tokens, over {MAX_BATCH_TOKENS:,}",
                       "lower micro_batch_size (or --batch-size) and raise grad_accum")


def build_stream(spec, tokenizer, split: str = "train", rank: int = 0, world_size: int = 1):
    """The batch stream for a recipe data section."""
    check_batch_size(spec.seq_len)
    mixer = DocumentMixer(spec, split, rank, world_size)
    cls = TaskStream if spec.format == "task" else PackedTextStream
    return cls(mixer, tokenizer, spec.seq_len)
