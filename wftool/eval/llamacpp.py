"""A GGUF file run by llama.cpp, called like a Hugging Face causal LM and its tokenizer.

`LlamaCppModel(input_ids, attention_mask, position_ids).logits` holds llama.cpp's logits at
every position, so `evaluate_model` and the lm-eval adapter score a GGUF export with the same
code as the PyTorch model. Each document of a packed row (its position ids restart at 0) and
each right-padded example runs as a sequence of its own, which is what the PyTorch forward
computes for such batches; logits of padding stay zero (nothing scores them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from wftool.errors import WftError
from wftool.runtime.llamacpp import open_llama


class LlamaCppModel(nn.Module):
    """llama.cpp with all-position logits (`logits_all`), for scoring; `n_ctx` bounds the
    longest sequence."""

    def __init__(self, path: str | Path, n_ctx: int, threads: int = 1):
        super().__init__()
        self.llm = open_llama(path, n_ctx, threads, logits_all=True)
        self.path, self.n_ctx, self.n_vocab = Path(path), n_ctx, self.llm.n_vocab()
        self.metadata = dict(self.llm.metadata)

    @property
    def file_type(self) -> str:
        """The GGUF's weight type as llama.cpp names it: TQ2_0, TQ1_0, F16, ..."""
        from gguf import LlamaFileType

        from wftool.export.ternary_packing import Q2_0_FILE_TYPE

        try:
            file_type = int(self.metadata["general.file_type"])
        except (KeyError, ValueError):
            return "GGUF"
        if file_type == Q2_0_FILE_TYPE:  # newer than gguf-py's table
            return "Q2_0"
        try:
            return LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            return "GGUF"

    @property
    def context_length(self) -> int:
        """The context the model was trained with (from the GGUF metadata)."""
        arch = self.metadata.get("general.architecture", "")
        return int(self.metadata.get(f"{arch}.context_length", self.n_ctx))

    def _logits(self, ids: list[int]) -> torch.Tensor:
        if len(ids) > self.n_ctx:
            raise WftError(f"a sequence of {len(ids)} tokens does not fit llama.cpp's context "
                           f"of {self.n_ctx}", "lower --seq-len")
        self.llm.reset()
        self._eval(ids)
        return torch.from_numpy(np.array(self.llm.scores[: len(ids)], dtype=np.float32))

    def _eval(self, ids: list[int]) -> None:
        """llm.eval, whose decode failures (llama_decode's status: no room in the KV cache,
        out of memory) are the user's to fix, not a traceback."""
        try:
            self.llm.eval(ids)
        except RuntimeError as err:
            raise WftError(f"llama.cpp failed on a sequence of {len(ids)} tokens of "
                           f"{self.path.name} (context {self.n_ctx}): {err}",
                           "lower --seq-len (llama.cpp runs one sequence at a time, so "
                           "--batch-size does not matter here), or free memory") from None

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        from transformers.modeling_outputs import CausalLMOutput

        batch, width = input_ids.shape
        logits = torch.zeros(batch, width, self.n_vocab)
        for row in range(batch):
            length = int(attention_mask[row].sum()) if attention_mask is not None else width
            ids = input_ids[row, :length].tolist()
            cuts = [0]
            if position_ids is not None:
                cuts += [i for i in range(1, length) if int(position_ids[row, i]) == 0]
            for start, end in zip(cuts, cuts[1:] + [length]):
                logits[row, start:end] = self._logits(ids[start:end])
        return CausalLMOutput(logits=logits)

    def generate(self, input_ids, max_new_tokens: int, eos_token_id=None,
                 stopping_criteria=None, **_) -> torch.Tensor:
        """Greedy continuation of one sequence: the argmax of llama.cpp's logits, the pick
        accuracy judges; `stopping_criteria` are called on prompt + new tokens after every
        token. Returns prompt + new tokens, as Hugging Face's generate does."""
        ids = input_ids[0].tolist()
        self.llm.reset()
        self._eval(ids)
        new: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            new.append(token)
            if token == eos_token_id or self.llm.n_tokens >= self.n_ctx:
                break
            if stopping_criteria and stopping_criteria(torch.tensor([ids + new]), None).all():
                break
            self._eval([token])
        return torch.tensor([ids + new])

    def close(self) -> None:
        self.llm.close()


class LlamaCppTokenizer:
    """The tokenizer stored in the GGUF, called as the packing code and lm-eval call a Hugging
    Face tokenizer. Special-token text (`<|im_end|>`) is parsed as the special token, as the
    Hugging Face tokenizer does; no BOS is added (wft's data has none)."""

    def __init__(self, model: LlamaCppModel):
        self.llm = model.llm
        eos = self.llm.token_eos()
        self.eos_token_id = eos if eos >= 0 else None
        pad = model.metadata.get("tokenizer.ggml.padding_token_id")
        self.pad_token_id = int(pad) if pad is not None else None
        self.chat_template = model.metadata.get("tokenizer.chat_template")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not text:
            return []
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def __call__(self, text, add_special_tokens: bool = False) -> dict:
        if isinstance(text, str):
            return {"input_ids": self.encode(text)}
        return {"input_ids": [self.encode(t) for t in text]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        raw = self.llm.detokenize(list(ids), special=not skip_special_tokens)
        return raw.decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.llm.n_vocab()
