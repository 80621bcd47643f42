"""Backend-independent text generation: limits, stop sequences, incremental detokenization.

An engine only turns a prompt's token ids into a stream of sampled token ids; everything a
client sees (text deltas, where to stop, why it stopped, token counts) is decided here, so
the llama.cpp and torch backends answer identically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

from wftool.decoding.modes import AUTOREGRESSIVE, Decoding
from wftool.decoding.sampling import GREEDY_BELOW, Sampling  # noqa: F401 (re-exported)

# Tokens that end an assistant turn in common chat templates; a chat stops on any that the
# vocabulary holds as a single token, besides the model's EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class Engine(Protocol):
    """What a backend provides; see engine_torch.py and engine_llamacpp.py."""

    context_length: int
    chat_template: str | None

    def encode(self, text: str, chat: bool) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def render_chat(self, messages: list[dict]) -> str: ...

    def stop_ids(self, chat: bool) -> set[int]: ...

    def sample(self, prompt_ids: list[int], sampling: Sampling, max_tokens: int | None = None,
               decoding: Decoding = AUTOREGRESSIVE) -> Iterator[int]:
        """Token ids after the prompt; `max_tokens` sizes the last diffusion block (None:
        until the caller stops). Only the torch backend decodes other than `ar`."""


@dataclass
class Piece:
    """A text delta; `finish_reason` is set on the last one ("stop" or "length")."""

    text: str
    finish_reason: str | None = None


@dataclass
class Generation:
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    chat: bool = False
    decoding: Decoding = AUTOREGRESSIVE
    completion_tokens: int = 0


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def generate(engine: Engine, request: Generation) -> Iterator[Piece]:
    """Sample until EOS / end of turn, a stop string, or max_tokens; yield text deltas.

    Text is decoded from all generated ids each step (a token may end mid-character), and
    a tail that could be the start of a stop string is held back until it is decided; when
    generation ends any other way, the held-back tail is sent."""
    stop_ids = engine.stop_ids(request.chat)
    ids: list[int] = []
    sent = 0  # characters of the decoded text already yielded
    finish, stopped_by_string = "length", False
    if request.max_tokens > 0:
        tokens = engine.sample(request.prompt_ids, request.sampling, request.max_tokens,
                               request.decoding)
        for token in tokens:
            if token in stop_ids:
                finish = "stop"
                break
            ids.append(token)
            request.completion_tokens = len(ids)
            text = engine.decode(ids)
            found = [text.find(s) for s in request.stop if s]
            cut = min((max(i, sent) for i in found if i >= 0), default=-1)
            if cut >= 0:
                if cut > sent:
                    yield Piece(text[sent:cut])
                finish, stopped_by_string = "stop", True
                break
            ready = len(text) - _held_back(text, request.stop)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
                ready = min(ready, len(text.rstrip("\ufffd")))
            if ready > sent:
                yield Piece(text[sent:ready])
                sent = ready
            if len(ids) >= request.max_tokens:
                break
    if not stopped_by_string and ids:
        text = engine.decode(ids)
        if len(text) > sent:
            yield Piece(text[sent:])
    yield Piece("", finish)
