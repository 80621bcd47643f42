"""Tiny models saved as a user would have them, held-out files, and direct computations of
the numbers `wft eval` reports (plain cross-entropy on unpacked, unpadded sequences)."""

import importlib.util
import json
import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_llama
from wftool.data.synthetic import SyntheticLanguage, word_class_task
from wftool.model.checkpoint import TernaryMetadata, save_model_dir
from wftool.model.families import FAMILIES
from wftool.model.surgery import convert_to_bitnet
from wftool.model.tokenizer import train_synthetic_tokenizer

# Widths that are multiples of 256, so the student also exports to TQ GGUF types.
STUDENT_SHAPE = dict(vocab_size=512, hidden_size=256, intermediate_size=512,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
# Untrained models have near ties. Batched and single-sequence matmuls round differently
# (float32: logits move by ~1e-6), so where the top two logits of a full-precision model are
# closer than this, either may be the argmax: such picks are not compared.
DECISIVE = 1e-3
# How far a full-precision model's mean NLL from padded, packed batches may sit from the
# direct computation: float32 rounding moves it by ~1e-6; letting documents of a packed row
# attend to each other moves it by 4e-3 even on these untrained models.
DIRECT_TOLERANCE = 2e-4
# A ternary student is compared on the very batches `wft eval` scores instead: its int8
# activations amplify rounding (a value at a rounding boundary flips a code, which shifts the
# next layer's inputs and flips more codes). Padded batches of 4 instead of single examples
# flipped 0.1% of a mix-0.5 student's codes, moved logits by up to 2e-2 (more than most
# top-2 margins of an untrained student, so accuracy verdicts flip) and the mean task NLL by
# 1.3e-4 (2.2e-4 on another CPU). On the same tensors the model's arithmetic is identical;
# only the loss reduction differs (float32 in wft, float64 here: ~1e-7).
SAME_BATCH_TOLERANCE = 1e-5


def top2_margin(scores):
    """Gap between the highest and second-highest value along the last axis."""
    top = torch.as_tensor(scores).double().topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def require_lm_eval():
    """Skip where lm-eval-harness is absent, except where WFT_REQUIRE_LMEVAL=1 demands it."""
    if importlib.util.find_spec("lm_eval") is not None:
        return
    if os.environ.get("WFT_REQUIRE_LMEVAL") == "1":
        pytest.fail("lm-eval is required here (WFT_REQUIRE_LMEVAL=1) but missing")
    pytest.skip("lm-eval is not installed")


@pytest.fixture(scope="session")
def tokenizer():
    return train_synthetic_tokenizer(512)


def make_student(tokenizer, path, quant_mix: float = 1.0):
    model = tiny_llama(**STUDENT_SHAPE)
    convert_to_bitnet(model, FAMILIES["llama"])
    with torch.no_grad():  # sub-norms away from 1, so a load that skipped them would show
        for name, param in model.named_parameters():
            if "sub_norm" in name:
                param.uniform_(0.5, 1.5)
    meta = TernaryMetadata("llama", "paper", model.config.rms_norm_eps, quant_mix=quant_mix)
    save_model_dir(model, tokenizer, path, meta)
    return path


def export_gguf(model_dir, export_type, output):
    """The GGUF `wft export-gguf` writes (read-back checks are export's own tests' job)."""
    from typer.testing import CliRunner

    from wftool.cli import app

    result = CliRunner().invoke(app, ["export-gguf", str(model_dir), "--type", export_type,
                                      "--output", str(output), "--no-validate"])
    assert result.exit_code == 0, result.output
    return output


@pytest.fixture(scope="session")
def student_dir(tokenizer, tmp_path_factory):
    return make_student(tokenizer, tmp_path_factory.mktemp("student") / "final")


@pytest.fixture(scope="session")
def teacher_dir(tokenizer, tmp_path_factory):
    model = tiny_llama(**STUDENT_SHAPE)
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp("teacher") / "final")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """Seven paragraphs of the synthetic language, of different lengths."""
    language = SyntheticLanguage()
    docs = [language.document(seed=7, index=i, n_words=8 + 5 * i) for i in range(7)]
    path = tmp_path_factory.mktemp("data") / "heldout.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.fixture(scope="session")
def task_file(tokenizer, student_dir, tmp_path_factory):
    """Prompt/answer pairs, half of them answered by the student's own greedy tokens (so
    accuracy is neither 0 nor 1), half with a wrong answer."""
    from wftool.model.checkpoint import load_ternary_model

    model, _, _ = load_ternary_model(student_dir)
    task = word_class_task()
    rows = []
    for index in range(40):
        prompt, answer = task.example(3, index)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=2, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        greedy = tokenizer.decode(out[0, len(prompt_ids):])
        new = out[0, len(prompt_ids):].tolist()
        if tokenizer(greedy, add_special_tokens=False)["input_ids"] != new:
            continue  # keep answers that tokenize back to the same tokens
        rows.append({"prompt": prompt, "answer": greedy if index % 2 else answer + " fe"})
        if len(rows) == 12:
            break
    path = tmp_path_factory.mktemp("data") / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def packed_rows(tokenizer, docs, seq_len):
    """Documents + EOS, concatenated and cut into rows of seq_len; each row as the list of
    its document pieces."""
    tokens, owner = [], []
    for d, doc in enumerate(docs):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        tokens += ids
        owner += [d] * len(ids)
    rows = []
    for begin in range(0, len(tokens), seq_len):
        row, who = tokens[begin:begin + seq_len], owner[begin:begin + seq_len]
        segments, start = [], 0
        for i in range(1, len(row) + 1):
            if i == len(row) or who[i] != who[i - 1]:
                segments.append(row[start:i])
                start = i
        rows.append(segments)
    return rows


def direct_text_nll(logits_of, tokenizer, docs, seq_len):
    """(summed NLL, scored tokens): each document piece runs alone through `logits_of`; in a
    row every token after the first is predicted by the position before it."""
    total, count = 0.0, 0
    for segments in packed_rows(tokenizer, docs, seq_len):
        logits = torch.cat([logits_of(seg) for seg in segments])
        row = torch.tensor([t for seg in segments for t in seg])
        total += float(F.cross_entropy(logits[:-1].double(), row[1:], reduction="sum"))
        count += len(row) - 1
    return total, count


@dataclass
class TaskNumbers:
    """A direct computation over task examples. `right` counts every example judged right;
    `sure_right` only those whose every judged token has a DECISIVE margin, and `close` the
    examples with a near tie somewhere, whose verdict another rounding may flip."""

    nll: float  # summed over answer + EOS tokens
    tokens: int
    right: int
    judged: int
    sure_right: int
    close: int

    def assert_accuracy(self, accuracy: float) -> None:
        """`accuracy` (reported) agrees on every decisive example, and close ones are few."""
        assert self.close <= self.judged // 4, "too many near ties to test accuracy"
        reported = round(accuracy * self.judged)
        assert accuracy == reported / self.judged
        assert self.sure_right <= reported <= self.sure_right + self.close, (
            reported, self.sure_right, self.close)


def direct_task(logits_of, tokenizer, rows) -> TaskNumbers:
    """Each example run alone: its answer + EOS loss, and whether greedy gives the answer."""
    total, count, right, sure_right, close = 0.0, 0, 0, 0, 0
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        targets = torch.tensor(answer + [tokenizer.eos_token_id])
        logits = logits_of(prompt + answer + [tokenizer.eos_token_id])
        scoring = logits[len(prompt) - 1 : -1]
        total += float(F.cross_entropy(scoring.double(), targets, reduction="sum"))
        count += len(targets)
        is_right = bool(scoring[:-1].argmax(-1).eq(targets[:-1]).all())
        is_close = bool(top2_margin(scoring[:-1]).lt(DECISIVE).any())
        right += is_right
        sure_right += is_right and not is_close
        close += is_close
    return TaskNumbers(total, count, right, len(rows), sure_right, close)


def torch_logits(model):
    def logits_of(ids):
        with torch.no_grad():
            return model(torch.tensor([ids]), use_cache=False).logits[0].float()
    return logits_of


def expected_numbers(model, tokenizer, text_file, task_file, seq_len):
    """What `wft eval --text text_file --task task_file --seq-len seq_len` must report for a
    full-precision PyTorch model, computed directly (no packing, no padding)."""
    from wftool.eval.heldout import file_documents

    logits_of = torch_logits(model)
    nll, tokens = direct_text_nll(logits_of, tokenizer, file_documents(text_file, "text"),
                                  seq_len)
    task = direct_task(logits_of, tokenizer, read_jsonl(task_file))
    return {"text_loss": nll / tokens, "text_tokens": tokens, "task_loss": task.nll / task.tokens,
            "task_tokens": task.tokens, "task_accuracy": task.right / task.judged,
            "task_examples": task.judged, "task": task, "tolerance": DIRECT_TOLERANCE}


def same_batch_numbers(model, tokenizer, text_file, task_file, seq_len, batch_size):
    """What `wft eval ... --batch-size batch_size` must report for a ternary student, computed
    on the very batches it scores (see SAME_BATCH_TOLERANCE): float64 cross-entropy of every
    labelled token, and an example right when all its answer tokens but the closing EOS are
    the argmax. The batches' layout is checked against the direct computation with a
    full-precision model (`expected_numbers`)."""
    from wftool.data.packing import model_inputs
    from wftool.eval.heldout import HeldOutSet

    numbers = {}
    for kind, path in (("text", text_file), ("task", task_file)):
        held = HeldOutSet(kind, str(path), seq_len, file=path).batches(tokenizer, batch_size)
        nll, tokens, right, judged = 0.0, 0, 0, 0
        for batch in held.batches:
            with torch.no_grad():
                logits = model(**model_inputs(batch)).logits
            for row_logits, labels in zip(logits[:, :-1], batch["labels"][:, 1:]):
                scored = labels.ne(-100)
                picked, wanted = row_logits[scored], labels[scored]
                nll += float(F.cross_entropy(picked.double(), wanted, reduction="sum"))
                tokens += len(wanted)
                if kind == "task" and len(wanted) >= 2:  # the last scored token is the EOS
                    judged += 1
                    right += bool(picked[:-1].argmax(-1).eq(wanted[:-1]).all())
        numbers.update({f"{kind}_loss": nll / tokens, f"{kind}_tokens": tokens})
    numbers.update(task_accuracy=right / judged, task_examples=judged,
                   task=TaskNumbers(nll, tokens, right, judged, right, 0),  # no near ties
                   tolerance=SAME_BATCH_TOLERANCE)
    return numbers


def reference_numbers(path, text_file, task_file, seq_len, batch_size):
    """What `wft eval` must report for the model directory at `path`: a full-precision model's
    numbers computed directly, a ternary student's on the same batches (at its saved mix)."""
    from wftool.model.checkpoint import load_model_dir

    model, tokenizer, meta = load_model_dir(path)
    if meta is None:
        return expected_numbers(model, tokenizer, text_file, task_file, seq_len)
    return same_batch_numbers(model, tokenizer, text_file, task_file, seq_len, batch_size)


def assert_matches(row, expected):
    """A `wft eval` row equals `expected_numbers` or `same_batch_numbers`: token counts
    exactly, accuracy on every example without a near tie, losses within the tolerance the
    reference carries."""
    for key in ("text_tokens", "task_tokens", "task_examples"):
        assert row[key] == expected[key], key
    expected["task"].assert_accuracy(row["task_accuracy"])
    for key in ("text_loss", "task_loss"):
        assert row[key] == pytest.approx(expected[key], abs=expected["tolerance"]), key
    assert row["text_ppl"] == pytest.approx(math.exp(row["text_loss"]), rel=1e-9)
