"""The torch backend: a wft checkpoint of any supported family, with packed ternary weights.

Every BitLinear becomes a TernaryLinear (int8 codes + delta, integer matmul), so the served
model computes what the export computes and holds no latent weights. Qwen3 students, which
no upstream llama.cpp architecture can hold, are served this way. A unified student
(`wft unified`) also decodes by block diffusion or self-speculatively (wftool/decoding), as
each request asks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from wftool.decoding.kv_cache import lookahead_problem
from wftool.decoding.modes import AUTOREGRESSIVE, Decoding, decode
from wftool.decoding.sampling import sample_token  # noqa: F401 (re-exported)
from wftool.model.mask_token import diffusion_settings
from wftool.serve.generation import END_OF_TURN_TOKENS, Sampling


class TorchEngine:
    def __init__(self, model, tokenizer, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self.chat_template = getattr(tokenizer, "chat_template", None)
        self._eos = self._eos_ids()
        # A unified student's mask token and decoding settings; None for any other model.
        self.diffusion = diffusion_settings(model)
        # Why diffusion and speculative decoding cannot run on this model, if they cannot.
        self.diffusion_problem = (None if self.diffusion is None
                                  else lookahead_problem(model, self.diffusion.attention))
        self._end_of_turn = {
            tid for token in END_OF_TURN_TOKENS
            if (tid := tokenizer.convert_tokens_to_ids(token)) is not None
            and tid != tokenizer.unk_token_id
        }

    @classmethod
    def load(cls, path: Path, threads: int | None = None, device="cpu") -> TorchEngine:
        from wftool.model.checkpoint import load_model_dir
        from wftool.quant.ternary_linear import pack_ternary_layers

        model, tokenizer, meta = load_model_dir(path, device=device)
        if meta is not None:
            pack_ternary_layers(model)
        return cls(model, tokenizer, threads)

    def _eos_ids(self) -> set[int]:
        ids = set()
        sources = [self.tokenizer.eos_token_id]
        generation = getattr(self.model, "generation_config", None)
        # A model's own generation_config.json may list several EOS ids (Llama 3 does); one
        # derived from config.json defaults may name ids of another tokenizer.
        if generation is not None and not getattr(generation, "_from_model_config", True):
            sources.append(generation.eos_token_id)
        for source in sources:
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    def encode(self, text: str, chat: bool) -> list[int]:
        # A rendered chat prompt already holds the template's special tokens.
        return self.tokenizer(text, add_special_tokens=not chat)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)

    def stop_ids(self, chat: bool) -> set[int]:
        return self._eos | self._end_of_turn if chat else set(self._eos)

    def sample(self, prompt_ids: list[int], sampling: Sampling, max_tokens: int | None = None,
               decoding: Decoding = AUTOREGRESSIVE) -> Iterator[int]:
        return decode(self.model, prompt_ids, max_tokens, decoding, sampling=sampling,
                      settings=self.diffusion)
