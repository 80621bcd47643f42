"""A small stochastic language: real, learnable text with a known entropy, no download.

Words are made-up syllable strings; each word is followed by one of a few successors drawn
from a sparse random Markov chain, and "." ends a sentence. Because the chain is explicit,
its entropy rate (the best loss any model can reach, per word) is computed exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
END = "."


@dataclass(frozen=True)
class SyntheticLanguage:
    seed: int = 0
    n_words: int = 240
    successors: int = 6  # how many words may follow a given word
    concentration: float = 0.6  # Dirichlet alpha: lower = more predictable text
    dialect: int = 0  # same words, different transitions: what the classification task tells

    @cached_property
    def words(self) -> list[str]:
        rng = np.random.default_rng(self.seed)
        seen: set[str] = set()
        words = [END]
        while len(words) < self.n_words:
            n_syllables = int(rng.integers(1, 4))
            word = "".join(
                _ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                for _ in range(n_syllables)
            )
            if word not in seen:
                seen.add(word)
                words.append(word)
        return words

    @cached_property
    def _chain(self) -> tuple[np.ndarray, np.ndarray]:
        """Successor ids [n_words, successors] and their probabilities."""
        rng = np.random.default_rng([self.seed, 1 + self.dialect])
        nexts = np.stack(
            [rng.choice(self.n_words, self.successors, replace=False) for _ in range(self.n_words)]
        )
        probs = rng.dirichlet(np.full(self.successors, self.concentration), size=self.n_words)
        return nexts, probs

    def transition_matrix(self) -> np.ndarray:
        nexts, probs = self._chain
        matrix = np.zeros((self.n_words, self.n_words))
        np.add.at(matrix, (np.arange(self.n_words)[:, None], nexts), probs)
        return matrix

    def stationary_distribution(self) -> np.ndarray:
        # Lazy chain (I + P) / 2 has the same stationary law and converges even if P is periodic.
        p = 0.5 * (np.eye(self.n_words) + self.transition_matrix())
        pi = np.full(self.n_words, 1.0 / self.n_words)
        for _ in range(10_000):
            nxt = pi @ p
            if np.abs(nxt - pi).max() < 1e-13:
                break
            pi = nxt
        return pi / pi.sum()

    def entropy_rate_nats(self) -> float:
        """Entropy per word of the stationary chain, in nats."""
        p = self.transition_matrix()
        with np.errstate(divide="ignore", invalid="ignore"):
            row_entropy = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
        return float(self.stationary_distribution() @ row_entropy)

    def sample_words(self, rng: np.random.Generator, n_words: int) -> list[str]:
        nexts, probs = self._chain
        state = 0  # documents start after an implicit sentence end
        out = []
        for _ in range(n_words):
            state = int(nexts[state, rng.choice(self.successors, p=probs[state])])
            out.append(self.words[state])
        return out

    def sample_document(self, rng: np.random.Generator, n_words: int = 64) -> str:
        return " ".join(self.sample_words(rng, n_words))

    def documents(self, n: int, seed: int, n_words: int = 64) -> list[str]:
        rng = np.random.default_rng(seed)
        return [self.sample_document(rng, n_words) for _ in range(n)]

    def document(self, seed: int, index: int, n_words: int = 64) -> str:
        """Document ``index`` of the stream ``seed``: random access, so resuming is O(1)."""
        return self.sample_document(np.random.default_rng([seed, index]), n_words)


TASK_LABELS = ("left", "right")  # answer text per dialect
TASK_PROMPT_SUFFIX = " ->"


@dataclass(frozen=True)
class DialectTask:
    """Classification: which of two dialects (same words, different grammar) wrote a text.

    Each example is a prompt (text + " ->") and a generated answer (" left" / " right"), so
    accuracy is measured the way the paper measures it: by generating the label text.
    """

    seed: int = 0
    n_words: int = 12

    @cached_property
    def dialects(self) -> tuple[SyntheticLanguage, SyntheticLanguage]:
        return dialect_language(0, self.seed), dialect_language(1, self.seed)

    def example(self, seed: int, index: int) -> tuple[str, str]:
        rng = np.random.default_rng([seed, index, 7])
        label = int(rng.integers(2))
        text = self.dialects[label].sample_document(rng, self.n_words)
        return text + TASK_PROMPT_SUFFIX, " " + TASK_LABELS[label]


@lru_cache(maxsize=8)
def dialect_language(dialect: int, seed: int = 0) -> SyntheticLanguage:
    return SyntheticLanguage(seed, dialect=dialect)


def mixed_dialect_document(seed: int, index: int, n_words: int = 64) -> str:
    """Pre-training text for the tiny pipeline: either dialect, alternating per document."""
    return dialect_language(index % 2).document(seed, index, n_words)
