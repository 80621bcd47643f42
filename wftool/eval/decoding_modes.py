"""`wft eval` on a unified student: each decoding mode's speed and task accuracy.

Speed: greedy decoding of `new_tokens` tokens after the first `PROMPT_TOKENS` tokens of a
few held-out text rows (no stop token, so every mode makes the same number), timed by the
decoders themselves. Accuracy: the share of held-out task examples whose answer (EOS
excluded) the mode decodes exactly from the prompt. Greedy self-speculative decoding must
give what autoregressive decoding gives; the report says whether it did.
"""

from __future__ import annotations

from wftool.data.packing import IGNORE_INDEX
from wftool.decoding import DECODING_MODES, DecodeStats, Decoding, decode

PROMPT_TOKENS = 16


def decoding_report(model, text_batches: list[dict], task_batches: list[dict],
                    new_tokens: int = 32, prompts: int = 4, examples: int = 128) -> dict:
    """{mode: {"tokens_per_second", "tokens_per_forward"[, "task_accuracy",
    "task_examples"][, "acceptance", "equals_ar"]}} for every decoding mode."""
    report: dict[str, dict] = {}
    texts = _text_prompts(text_batches, prompts)
    answers = _task_examples(task_batches, examples)
    outputs = {}
    for mode in DECODING_MODES:
        decoding = Decoding(mode)
        stats = DecodeStats()
        outputs[mode] = [list(decode(model, ids, new_tokens, decoding, stats=stats))
                         for ids in texts]
        entry = {"tokens_per_second": stats.tokens_per_second,
                 "tokens_per_forward": stats.tokens_per_forward}
        if mode == "speculative":
            entry["acceptance"] = stats.acceptance
        if answers:
            right = sum(list(decode(model, prompt, len(answer), decoding)) == answer
                        for prompt, answer in answers)
            entry.update(task_accuracy=right / len(answers), task_examples=len(answers))
        report[mode] = entry
    report["speculative"]["equals_ar"] = outputs["speculative"] == outputs["ar"]
    return report


def _text_prompts(batches: list[dict], count: int) -> list[list[int]]:
    rows = [row[:PROMPT_TOKENS].tolist() for batch in batches for row in batch["input_ids"]]
    return rows[:count]


def _task_examples(batches: list[dict], count: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids without its closing EOS) of the first `count` examples."""
    found = []
    for batch in batches:
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            answer_at = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
            if len(answer_at) < 2 or answer_at[0] == 0:  # an answer beyond its EOS, a prompt
                continue
            found.append((ids[:answer_at[0]], [ids[i] for i in answer_at[:-1]]))
            if len(found) == count:
                return found
    return found
