"""Tiny unified models for decoding: Llamas whose last token id (63) is the mask token."""

import pytest
import torch

from tests.conftest import tiny_llama
from wftool.model.mask_token import DiffusionSettings

VOCAB = 64
MASK = VOCAB - 1
PROMPTS = [[1, 2, 3, 4, 5], [7], [40, 41, 9, 9, 30, 2, 17]]


def tiny_unified_llama(**overrides):
    """A random Llama (hidden 32, 2 layers, 4 heads). A wide init spreads the logits, so
    greedy choices and confidence ranks are decisive: computations that round differently
    (a KV cache or not) pick the same tokens."""
    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                  max_position_embeddings=128, initializer_range=0.5)
    values.update(overrides)
    return tiny_llama(**values)


def settings(**overrides) -> DiffusionSettings:
    return DiffusionSettings(mask_token_id=MASK, **{"block_size": 4, **overrides})


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small gain nothing from a second thread, whose synchronisation stalls
    badly on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model():
    return tiny_unified_llama()


@pytest.fixture(scope="session")
def self_consistent_model():
    return train_self_consistent()


def train_self_consistent():
    """A student trained until its two heads agree: on rows that repeat one token, next-token
    CE on clean rows plus the shifted masked-diffusion loss on rows masked at random
    (bidirectional attention), so drafts of masks are what the AR head would say."""
    model = tiny_unified_llama(initializer_range=0.02)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    generator = torch.Generator().manual_seed(0)
    rows, length = 16, 12
    everywhere = torch.ones(1, 1, length, length, dtype=torch.bool)
    for _ in range(40):
        tokens = torch.randint(0, 20, (rows, 1), generator=generator).expand(rows, length)
        clean = model(input_ids=tokens).logits
        ar_loss = torch.nn.functional.cross_entropy(clean[:, :-1].flatten(0, 1),
                                                    tokens[:, 1:].flatten())
        t = torch.rand(rows, 1, generator=generator) * 0.9 + 0.1
        masked = torch.rand(rows, length, generator=generator) < t
        masked[:, 0] = False  # with the shift, the first token has nothing to predict it
        noisy = torch.where(masked, torch.full_like(tokens, MASK), tokens)
        logits = model(input_ids=noisy, attention_mask=everywhere.expand(rows, 1, -1, -1)).logits
        picked = masked[:, 1:]
        dlm_loss = torch.nn.functional.cross_entropy(logits[:, :-1][picked], tokens[:, 1:][picked])
        optimizer.zero_grad()
        (ar_loss + dlm_loss).backward()
        optimizer.step()
    return model.eval()
