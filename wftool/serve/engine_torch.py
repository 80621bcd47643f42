"""The torch backend: a wft checkpoint of any supported family, with packed ternary weights.

Every BitLinear becomes a TernaryLinear (int8 codes + delta, integer matmul), so the served
model computes what the export computes and holds no latent weights. Qwen3 students, which
no upstream llama.cpp architecture can hold, are served this way.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Iterator

import torch

from wftool.serve.generation import END_OF_TURN_TOKENS, Sampling


def sample_token(logits: torch.Tensor, sampling: Sampling, generator) -> int:
    """Greedy at temperature 0 (or near it); else llama.cpp's order, so both backends draw
    from the same distribution: keep the smallest set of tokens whose probability (before
    temperature) reaches top_p, then sample from softmax(logits / T) over that set."""
    if sampling.greedy:
        return int(logits.argmax())
    logits = logits.float()
    if sampling.top_p < 1.0:
        probs, order = torch.softmax(logits, dim=-1).sort(descending=True)
        outside = probs.cumsum(-1) - probs >= sampling.top_p
        outside[0] = False  # the top token always stays, even if top_p rounds to 0 in float32
        logits = logits.clone()
        logits[order[outside]] = float("-inf")
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


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
        # transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns,
        # and goes in 5.40); earlier 5.x releases only know the old one.
        forward = inspect.signature(model.forward).parameters
        self._cache_keyword = "cache" if "cache" in forward else "past_key_values"
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

    @torch.inference_mode()
    def sample(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[int]:
        from transformers import DynamicCache

        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        cache = {self._cache_keyword: DynamicCache(config=self.model.config)}
        inputs = torch.tensor([prompt_ids], device=self.device)
        while True:
            logits = self.model(input_ids=inputs, use_cache=True, **cache).logits
            token = sample_token(logits[0, -1], sampling, generator)
            yield token
            inputs = torch.tensor([[token]], device=self.device)
