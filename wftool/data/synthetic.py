"""A small stochastic language: real, learnable text with a known entropy, no download.

Words are made-up syllable strings; each word is followed by one of a few successors drawn
from a sparse random Markov chain, and "." ends a sentence. Because the chain is explicit,
its entropy rate (the best loss any model can reach, per word) is computed exactly.
"""

from __future__ import annotations

import bisect
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
    dialect: int = 0  # same words, different transitions: a second style of the language
    divergence: float = 0.3  # share of words whose successor probabilities differ by dialect

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
        """Successor ids [n_words, successors] and their probabilities.

        Dialects share the successor sets; for a `divergence` share of words they redraw the
        probabilities, so the corpus has two related but distinct styles.
        """
        rng = np.random.default_rng([self.seed, 1])
        nexts = np.stack(
            [rng.choice(self.n_words, self.successors, replace=False) for _ in range(self.n_words)]
        )
        alpha = np.full(self.successors, self.concentration)
        probs = rng.dirichlet(alpha, size=self.n_words)
        if self.dialect:
            rng = np.random.default_rng([self.seed, 2, self.dialect])
            rows = rng.random(self.n_words) < self.divergence
            probs[rows] = rng.dirichlet(alpha, size=int(rows.sum()))
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
        """Entropy per word of the stationary chain, in nats: the lowest loss per word any
        model can reach on this language's plain text."""
        p = self.transition_matrix()
        with np.errstate(divide="ignore", invalid="ignore"):
            row_entropy = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
        return float(self.stationary_distribution() @ row_entropy)

    @cached_property
    def _sampling_tables(self) -> tuple[list[list[int]], list[list[float]]]:
        """Successor ids and cumulative probabilities as Python lists: sampling a word is
        then one bisect, much faster than a numpy call per word."""
        nexts, probs = self._chain
        return nexts.tolist(), np.cumsum(probs, axis=1).tolist()

    def sample_words(self, rng: np.random.Generator, n_words: int) -> list[str]:
        nexts, cumulative = self._sampling_tables
        last = self.successors - 1
        state = 0  # documents start after an implicit sentence end
        out = []
        for u in rng.random(n_words).tolist():
            state = nexts[state][min(bisect.bisect_right(cumulative[state], u), last)]
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


TASK_LABELS = ("left", "right")  # the two word classes, as answer text
TASK_PROMPT_SUFFIX = " ->"


@dataclass(frozen=True)
class WordClassTask:
    """Classification that needs knowledge: every word of the lexicon belongs to one of two
    classes (a fixed random assignment, like facts about the world), and the answer is the
    class of a passage's last word, generated as text (" left" / " right").

    The pre-training corpus states these facts in annotated passages, so a model knows them
    from pre-training; a small task fine-tuning budget cannot teach all of them again. That
    is the situation in which ternary students lose what their teacher knew.
    """

    seed: int = 0
    n_words: int = 12
    n_entities: int = 96  # the words facts are about: the language's most frequent ones

    @cached_property
    def word_classes(self) -> dict[str, int]:
        language = dialect_language(0, self.seed)
        frequency = language.stationary_distribution()
        frequency[0] = 0.0  # "." is not an entity
        entities = [language.words[i] for i in np.argsort(-frequency)[: self.n_entities]]
        classes = np.random.default_rng([self.seed, 3]).integers(2, size=len(entities))
        return dict(zip(entities, classes.tolist()))

    def example(self, seed: int, index: int) -> tuple[str, str]:
        rng = np.random.default_rng([seed, index, 7])
        language = dialect_language(int(rng.integers(2)), self.seed)
        while True:  # passages that end on an entity
            words = language.sample_words(rng, self.n_words)
            if words[-1] in self.word_classes:
                break
        label = self.word_classes[words[-1]]
        return " ".join(words) + TASK_PROMPT_SUFFIX, " " + TASK_LABELS[label]


@lru_cache(maxsize=8)
def dialect_language(dialect: int, seed: int = 0) -> SyntheticLanguage:
    return SyntheticLanguage(seed, dialect=dialect)


@lru_cache(maxsize=4)
def word_class_task(seed: int = 0) -> WordClassTask:
    return WordClassTask(seed)


def mixed_dialect_document(seed: int, index: int, n_words: int = 64) -> str:
    """Pre-training text for the tiny pipeline. A quarter of the documents are plain text in
    one dialect; the rest are annotated passages, each followed by the class of its last
    word, the way web text carries the knowledge that downstream tasks later probe."""
    if index % 4 == 0:
        return dialect_language((index // 4) % 2).document(seed, index, n_words)
    task = word_class_task()
    passages = [task.example(seed, index * 8 + k) for k in range(max(1, n_words // 16))]
    return " ".join(prompt + answer + " ." for prompt, answer in passages)
