"""The llamacpp backend: any GGUF file llama.cpp loads, through llama-cpp-python.

Sampling runs inside llama.cpp; the chat template is the one stored in the GGUF
(`tokenizer.chat_template`), rendered with llama-cpp-python's own Jinja2 formatter as its
server does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from wftool.decoding.modes import AUTOREGRESSIVE, Decoding
from wftool.runtime.llamacpp import gguf_context_length, import_llama, open_llama
from wftool.serve.generation import END_OF_TURN_TOKENS, Sampling


class LlamaCppEngine:
    def __init__(self, path: Path, threads: int | None = None, context_length: int | None = None):
        import_llama("the llamacpp backend", "serve a model directory with --backend torch")
        threads = threads or os.cpu_count() or 1
        trained = gguf_context_length(path)
        if context_length is None or (trained and trained < context_length):
            context_length = trained  # never allocate a KV cache past what the model knows
        self.llm = open_llama(path, context_length or 0, threads)
        self.context_length = self.llm.n_ctx()
        metadata = self.llm.metadata
        self.chat_template = metadata.get("tokenizer.chat_template")
        self._add_bos = metadata.get("tokenizer.ggml.add_bos_token", "true") == "true"
        self._eos = {self.llm.token_eos()} - {-1}
        self._end_of_turn = set()
        for token in END_OF_TURN_TOKENS:
            ids = self.llm.tokenize(token.encode(), add_bos=False, special=True)
            if len(ids) == 1:
                self._end_of_turn.add(ids[0])
        self._formatter = None
        if self.chat_template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._formatter = Jinja2ChatFormatter(
                self.chat_template, eos_token=self._token_text(self.llm.token_eos()),
                bos_token=self._token_text(self.llm.token_bos()))

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def encode(self, text: str, chat: bool) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=self._add_bos and not chat, special=True)

    def decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict]) -> str:
        return self._formatter(messages=messages).prompt

    def stop_ids(self, chat: bool) -> set[int]:
        return self._eos | self._end_of_turn if chat else set(self._eos)

    def sample(self, prompt_ids: list[int], sampling: Sampling, max_tokens: int | None = None,
               decoding: Decoding = AUTOREGRESSIVE) -> Iterator[int]:
        if decoding.mode != "ar":  # the app refuses such requests before they get here
            raise ValueError(f"llama.cpp decodes autoregressively only, not {decoding.mode!r}")
        # set_seed persists in the Llama object: reset it, or one request's seed would make
        # every later unseeded request repeat the same "random" text.
        from llama_cpp import LLAMA_DEFAULT_SEED

        seed = LLAMA_DEFAULT_SEED if sampling.seed is None else sampling.seed
        self.llm.set_seed(seed % 2**32)
        # top_k 0 and min_p 0 switch those filters off: only temperature and top_p apply,
        # as in the torch backend and the OpenAI API. Temperature 0 is llama.cpp's greedy.
        temperature = 0.0 if sampling.greedy else sampling.temperature
        yield from self.llm.generate(prompt_ids, temp=temperature,
                                     top_p=sampling.top_p, top_k=0, min_p=0.0,
                                     repeat_penalty=1.0)

    def close(self) -> None:
        self.llm.close()
