"""Held-out evaluation: loss, perplexity and answer accuracy of a model's actual forward.

For a ternary student the forward is the quantized one, so these are the numbers the
exported model will show, not those of its latent weights.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter

import torch

from wftool.data.packing import IGNORE_INDEX, build_stream, model_inputs
from wftool.recipe.schema import DataSpec
from wftool.train.objectives import causal_lm_loss


def eval_batches(data: DataSpec, tokenizer, batch_size: int) -> list[dict]:
    """The fixed held-out batches of a data section (empty if nothing is held out).

    Named held-out sources (`data.eval`) give the batches `wft eval RECIPE` scores (each
    document once, at most `data.eval_batches` batches); the automatic split is drawn from
    the eval stream of the training sources."""
    if data.eval is not None:
        # Imported here: wftool.eval.heldout builds on this module.
        from wftool.eval.heldout import HeldOutSet

        held = HeldOutSet(data.format, "data.eval", data.seq_len, data=data)
        return held.batches(tokenizer, batch_size).batches
    if data.eval_fraction <= 0:
        return []
    stream = build_stream(data, tokenizer, "eval", 0, 1)
    return [stream.next_batch(batch_size) for _ in range(data.eval_batches)]


def _judged_answer_tokens(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, judged): next-token targets and the answer positions accuracy judges."""
    targets = labels[:, 1:]
    answer = targets.ne(IGNORE_INDEX)
    # The last labelled token of each row is the EOS that ends the answer: not judged.
    last = answer.long().cumsum(-1).eq(answer.sum(-1, keepdim=True)) & answer
    return targets, answer & ~last


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, judged): examples whose answer tokens (EOS excluded) are all greedy picks."""
    predictions = logits[:, :-1].argmax(-1)
    targets, judged = _judged_answer_tokens(labels)
    wrong = (predictions.ne(targets) & judged).any(-1)
    has_answer = judged.any(-1)
    return int((~wrong & has_answer).sum()), int(has_answer.sum())


def judged_answers(batches: list[dict]) -> list[tuple[int, ...]]:
    """The gold answer (token ids, closing EOS excluded) of every example `answer_accuracy`
    judges, in batch order."""
    answers = []
    for batch in batches:
        targets, judged = _judged_answer_tokens(batch["labels"])
        for row, mask in zip(targets.tolist(), judged.tolist()):
            answer = tuple(token for token, kept in zip(row, mask) if kept)
            if answer:
                answers.append(answer)
    return answers


def majority_floor(batches: list[dict]) -> dict:
    """{"examples", "majority_accuracy"} of task batches: how many examples accuracy judges,
    and the accuracy of always answering their most frequent answer (a model that learned
    one class scores exactly this); {} without judged examples."""
    answers = judged_answers(batches)
    if not answers:
        return {}
    most = Counter(answers).most_common(1)[0][1]
    return {"examples": len(answers), "majority_accuracy": most / len(answers)}


MODEL_MIN_WIDTH = 22  # model tables: an 80-column terminal folds names rather than hiding them


def accuracy_cell(row: dict, shared: bool = False) -> str:
    """A table cell for a row with "task_accuracy" (and "examples", "majority_accuracy" from
    `majority_floor`): accuracy in %, with the judged examples and the majority floor unless
    a line under the table says them for every row (`shared`, see `accuracy_basis`)."""
    accuracy = row.get("task_accuracy")
    if accuracy is None:
        return "-"
    if shared or not row.get("examples"):
        return f"{100 * accuracy:.1f}"
    return (f"{100 * accuracy:.1f} (n={row['examples']:,}, "
            f"floor {100 * row['majority_accuracy']:.1f})")


def accuracy_basis(rows: list[dict]) -> str | None:
    """When every row's accuracy was judged on the same examples, one line saying how many
    and the majority-class floor (the table's cells are then bare percentages); else None,
    and each cell carries its own (`accuracy_cell`)."""
    judged = {(r["examples"], r["majority_accuracy"]) for r in rows
              if r.get("task_accuracy") is not None and r.get("examples")}
    if len(judged) != 1:
        return None
    examples, majority = judged.pop()
    return (f"task acc %: {examples:,} examples judged; majority-class floor "
            f"{100 * majority:.1f} %")


def accuracy_notes(rows: list[dict]) -> list[str]:
    """Warnings under a table of rows with "model", "task_accuracy", "examples" and
    "majority_accuracy": models within one example of the majority floor, and models with
    identical accuracy on the same examples."""
    scored = [r for r in rows if r.get("task_accuracy") is not None and r.get("examples")]
    notes = []
    at_floor = [r for r in scored
                if abs(r["task_accuracy"] - r["majority_accuracy"]) * r["examples"] <= 1 + 1e-9]
    if at_floor:
        floor = at_floor[0]
        notes.append(
            f"{_names(at_floor)} {'is' if len(at_floor) == 1 else 'are'} at the majority-class "
            f"floor ({100 * floor['majority_accuracy']:.1f} % of {floor['examples']:,} "
            f"examples, within one example): {'it' if len(at_floor) == 1 else 'each'} may "
            "answer one class for everything")
    groups: dict[tuple[int, int], list[dict]] = {}
    for row in scored:
        correct = round(row["task_accuracy"] * row["examples"])
        groups.setdefault((correct, row["examples"]), []).append(row)
    for (correct, examples), tied in groups.items():
        if len(tied) > 1:
            notes.append(f"tie: {_names(tied)} score the same task accuracy "
                         f"({100 * tied[0]['task_accuracy']:.1f} %, {correct:,} of "
                         f"{examples:,} examples)")
    return notes


def _names(rows: list[dict]) -> str:
    names = [row["model"] for row in rows]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


@torch.no_grad()
def evaluate_model(model, batches: list[dict], task: bool, device=None, autocast=None,
                   held_out=None) -> dict:
    """{"eval_loss", "eval_ppl"[, "eval_accuracy"]} over `batches`; {} without batches.
    `held_out(outputs, batch) -> {name: tensor}` adds a stage's own objective as
    "eval_<name>" (the forward then returns hidden states), weighted like the loss.

    With several processes each scores its share of the batches and the sums are added up;
    every rank runs the same number of forwards (one without a batch left repeats the first,
    counted zero times), since a sharded model's forward is a collective."""
    from wftool.train.distributed import all_reduce_sum, world

    if not batches:
        return {}
    device = device or next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    rank, world_size = world()
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {"loss": 0.0, "tokens": 0.0, "correct": 0.0, "judged": 0.0}
    for first in range(0, len(batches), world_size):
        index = first + rank
        counted = index < len(batches)
        batch = {k: v.to(device) for k, v in batches[index if counted else 0].items()}
        with autocast():
            outputs = model(**model_inputs(batch), output_hidden_states=held_out is not None)
            parts = held_out(outputs, batch) if held_out is not None else {}
        if not counted:  # the keys still go in: every rank all-reduces the same list
            for name in parts:
                sums.setdefault(f"eval_{name}", 0.0)
            continue
        logits, labels = outputs.logits, batch["labels"]
        n = int(labels[:, 1:].ne(IGNORE_INDEX).sum())
        sums["loss"] += causal_lm_loss(logits, labels).item() * n
        sums["tokens"] += n
        for name, value in parts.items():
            sums[f"eval_{name}"] = sums.get(f"eval_{name}", 0.0) + float(value) * n
        if task:
            c, j = answer_accuracy(logits, labels)
            sums["correct"] += c
            sums["judged"] += j
    model.train(was_training)
    if world_size > 1:
        names = list(sums)  # the same on every rank: the same objective scored
        totals = all_reduce_sum(torch.tensor([sums[k] for k in names], dtype=torch.float64,
                                             device=device))
        sums = dict(zip(names, totals.tolist()))
    tokens = max(sums.pop("tokens"), 1)
    loss = sums.pop("loss") / tokens
    correct, judged = sums.pop("correct"), sums.pop("judged")
    result = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
    result.update({name: value / tokens for name, value in sums.items()})
    if judged:
        result["eval_accuracy"] = correct / judged
    return result
