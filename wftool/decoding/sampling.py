"""Choosing tokens from logits: greedy, or temperature and top-p in llama.cpp's order.

Every decoding mode and both serving backends draw from the same distribution, so a request
means the same thing whichever way it is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Temperatures below this sample greedily. softmax(logits / T) there already gives a token
# 1e-3 below the top logit under e^-100 of the mass, and tinier ones overflow float32 in
# either backend (1 / 1e-310 is inf; llama.cpp rounds 1e-40 to a subnormal and divides).
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # under GREEDY_BELOW (0 included) = greedy
    top_p: float = 1.0  # the top token is always kept, however small
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


GREEDY = Sampling(temperature=0.0)


def token_distribution(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution a non-greedy `sampling` draws from, over the last dimension: keep the
    smallest set of tokens whose probability (before temperature) reaches top_p, then
    softmax(logits / T) over that set. float32, any leading shape."""
    logits = logits.float()
    if sampling.top_p < 1.0:
        probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        outside = probs.cumsum(-1) - probs >= sampling.top_p
        outside[..., 0] = False  # the top token always stays, even if top_p rounds to 0
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return torch.softmax(logits / sampling.temperature, dim=-1)


def sample_token(logits: torch.Tensor, sampling: Sampling, generator) -> int:
    """One token from one position's logits: the argmax when greedy, else a draw from
    `token_distribution`."""
    if sampling.greedy:
        return int(logits.argmax())
    return int(torch.multinomial(token_distribution(logits, sampling), 1, generator=generator))


def choose_tokens(logits: torch.Tensor, sampling: Sampling, generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [n], confidence [n]) for n positions' logits [n, V]: the argmax or a draw per
    position, and its probability under softmax(logits) (temperature 1, so a confidence
    threshold means the same at any sampling temperature)."""
    probs = torch.softmax(logits.float(), dim=-1)
    if sampling.greedy:
        tokens = logits.argmax(-1)  # as sample_token: ties in rounded probabilities aside
    else:
        drawn = token_distribution(logits, sampling)
        tokens = torch.multinomial(drawn, 1, generator=generator).squeeze(-1)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)


def seeded_generator(sampling: Sampling, device) -> torch.Generator | None:
    """A generator seeded by the request, or None (torch's global one) when unseeded."""
    if sampling.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(sampling.seed)


def without_token(logits: torch.Tensor, token: int | None) -> torch.Tensor:
    """`logits` with `token` (the mask token, which is no answer) made impossible."""
    if token is None or token >= logits.shape[-1]:
        return logits
    logits = logits.clone()
    logits[..., token] = float("-inf")
    return logits
