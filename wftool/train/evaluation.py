"""Held-out evaluation: loss, perplexity and answer accuracy of a model's actual forward.

For a ternary student the forward is the quantized one, so these are the numbers the
exported model will show, not those of its latent weights.
"""

from __future__ import annotations

import contextlib
import math

import torch

from wftool.data.packing import IGNORE_INDEX, build_stream, model_inputs
from wftool.recipe.schema import DataSpec
from wftool.train.objectives import causal_lm_loss


def eval_batches(data: DataSpec, tokenizer, batch_size: int) -> list[dict]:
    """The fixed held-out batches of a data section (empty if nothing is held out)."""
    if data.eval_fraction <= 0:
        return []
    stream = build_stream(data, tokenizer, "eval", 0, 1)
    return [stream.next_batch(batch_size) for _ in range(data.eval_batches)]


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, judged): examples whose answer tokens (EOS excluded) are all greedy picks."""
    predictions = logits[:, :-1].argmax(-1)
    targets = labels[:, 1:]
    answer = targets.ne(IGNORE_INDEX)
    # The last labelled token of each row is the EOS that ends the answer: not judged.
    last = answer.long().cumsum(-1).eq(answer.sum(-1, keepdim=True)) & answer
    judged = answer & ~last
    wrong = (predictions.ne(targets) & judged).any(-1)
    has_answer = judged.any(-1)
    return int((~wrong & has_answer).sum()), int(has_answer.sum())


@torch.no_grad()
def evaluate_model(model, batches: list[dict], task: bool, device=None, autocast=None) -> dict:
    """{"eval_loss", "eval_ppl"[, "eval_accuracy"]} over `batches`; {} without batches."""
    if not batches:
        return {}
    device = device or next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    was_training = model.training
    model.eval()
    total_loss, total_tokens, correct, judged = 0.0, 0, 0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            logits = model(**model_inputs(batch)).logits
        labels = batch["labels"]
        n = int(labels[:, 1:].ne(IGNORE_INDEX).sum())
        total_loss += causal_lm_loss(logits, labels).item() * n
        total_tokens += n
        if task:
            c, j = answer_accuracy(logits, labels)
            correct, judged = correct + c, judged + j
    model.train(was_training)
    loss = total_loss / max(total_tokens, 1)
    result = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
    if judged:
        result["eval_accuracy"] = correct / judged
    return result
