"""lm-eval-harness tasks through wft's LM adapter, against direct computations: a local
multiple-choice task, rolling log-likelihood over more than one context window, and greedy
generation with stop strings. The adapter only calls the model, so direct computations use
a full-precision model: a ternary student's int8 activations make lm-eval's padded batches
round differently from one sequence at a time by more than its near ties (conftest.py)."""

import json

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import require_llamacpp
from tests.eval.conftest import DECISIVE, export_gguf, require_lm_eval, top2_margin
from wftool.model.checkpoint import load_model_dir

WORDS = ["kiza", "pa", "povo", "vo", "zafi", "zi", "lu", "domilu", "sabula", "nibo"]


@pytest.fixture(scope="module")
def student(student_dir):
    require_lm_eval()
    model, tokenizer, _ = load_model_dir(student_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    require_lm_eval()
    model, tokenizer, _ = load_model_dir(teacher_dir)
    return model, tokenizer


def _continuation_logprob(model, tokenizer, context, continuation):
    """log p(continuation | context), split into tokens as lm-eval splits them."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = F.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def _instances(kind, arguments):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i)
            for i, args in enumerate(arguments)]


def test_local_multiple_choice_task_accuracy_equals_direct_computation(
        teacher, teacher_dir, tmp_path):
    from typer.testing import CliRunner

    from wftool.cli import app

    model, tokenizer = teacher
    docs, right = [], 0
    for i in range(40):
        question = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(4))
        choices = [WORDS[(3 * i + k) % len(WORDS)] for k in range(3)]
        scores = [_continuation_logprob(model, tokenizer, question, " " + c) for c in choices]
        if top2_margin(scores) < DECISIVE:
            continue  # lm-eval's padded batches may round this near tie the other way
        best = max(range(3), key=scores.__getitem__)
        label = best if len(docs) % 2 else (best + 1) % 3  # half right, half wrong
        right += label == best
        docs.append({"question": question, "choices": choices, "label": label})
        if len(docs) == 8:
            break
    assert len(docs) == 8, "too few questions with a decisive best choice"
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    task = tmp_path / "wft_mc.yaml"
    task.write_text(f"""task: wft_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    out = tmp_path / "results.json"
    result = CliRunner().invoke(app, ["eval", str(teacher_dir), "--lm-eval", str(task),
                                      "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "wft_mc:acc" in result.output
    (row,) = json.loads(out.read_text())["models"]
    assert row["lm_eval"]["wft_mc:acc"] == pytest.approx(right / len(docs))
    assert row["lm_eval"]["wft_mc:n"] == len(docs)
    assert 0 < right < len(docs)


def test_rolling_loglikelihood_spans_several_windows(teacher):
    from wftool.eval.harness import WftLM

    model, tokenizer = teacher
    text = " ".join(WORDS[(7 * i) % len(WORDS)] for i in range(60))
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    window = 16
    assert len(tokens) > 3 * window
    (got,) = WftLM(model, tokenizer, batch_size=2, max_length=window).loglikelihood_rolling(
        _instances("loglikelihood_rolling", [(text,)]))
    # Direct: chunks of `window` tokens, each predicted once; the first from EOS + its own
    # prefix, later ones from the `window` tokens before the chunk's last token.
    expected, start, n = 0.0, 0, len(tokens)
    while start < n:
        end = min(start + window, n)
        if start == 0:
            inputs, first = [tokenizer.eos_token_id] + tokens[: end - 1], 0
        else:
            inputs, first = tokens[end - window - 1 : end - 1], start - end + window
        with torch.no_grad():
            logprobs = F.log_softmax(model(torch.tensor([inputs])).logits[0].double(), -1)
        expected += sum(float(logprobs[first + j - start, tokens[j]]) for j in range(start, end))
        start = end
    assert got == pytest.approx(expected, rel=1e-5)


def _decisive_greedy(model, tokenizer, steps):
    """(context, greedy token ids) for the first context whose every greedy step wins by a
    DECISIVE margin, so generation with a KV cache (other rounding) must pick the same."""
    for i in range(len(WORDS)):
        context = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3))
        ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        produced = []
        for _ in range(steps):  # greedy, no cache: argmax of the full forward each step
            with torch.no_grad():
                logits = model(torch.tensor([ids + produced])).logits[0, -1]
            if top2_margin(logits) < DECISIVE:
                break
            produced.append(int(logits.argmax()))
        if len(produced) == steps:
            return context, produced
    pytest.fail("no context whose greedy continuation is free of near ties")


def test_greedy_generation_stops_at_the_stop_string(teacher):
    from wftool.eval.harness import WftLM

    model, tokenizer = teacher
    context, produced = _decisive_greedy(model, tokenizer, 6)
    text = tokenizer.decode(produced)
    stop = text.strip()[-2:]  # a stop string the greedy text reaches
    lm = WftLM(model, tokenizer, batch_size=1, max_length=64)
    free, stopped = lm.generate_until(_instances("generate_until", [
        (context, {"until": [], "max_gen_toks": 6}),
        (context, {"until": [stop], "max_gen_toks": 6})]))
    assert free == text
    # Here the teacher repeats "o" after "kiza pa povo": a stop "oo" that begins in the
    # context must not end the continuation after one "o".
    assert stopped == text.split(stop)[0] and len(stopped) < len(text)


def test_gguf_loglikelihoods_match_the_student(student, student_dir, tmp_path):
    require_llamacpp()
    from wftool.eval.harness import WftLM
    from wftool.eval.llamacpp import LlamaCppModel, LlamaCppTokenizer

    model, tokenizer = student
    path = export_gguf(student_dir, "f16", tmp_path / "s.gguf")
    gguf = LlamaCppModel(path, n_ctx=128)
    try:
        requests = _instances("loglikelihood", [("kiza pa povo", " vo zafi"), ("zi lu", " nibo")])
        ours = WftLM(model, tokenizer, max_length=64).loglikelihood(requests)
        theirs = WftLM(gguf, LlamaCppTokenizer(gguf), max_length=64).loglikelihood(requests)
    finally:
        gguf.close()
    for (a, _), (b, _) in zip(ours, theirs):
        assert b == pytest.approx(a, rel=1e-2)


class _SilentEos:
    """The student's tokenizer, except that EOS decodes to "" (as a control token can)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id, self.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id

    def __call__(self, text, add_special_tokens=False):
        return self.tokenizer(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, skip_special_tokens=False):
        ids = [i for i in ids if i != self.eos_token_id]
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_generation_with_an_eos_that_decodes_to_nothing(student):
    from wftool.eval.harness import WftLM

    model, tokenizer = student
    request = ("kiza pa povo", {"until": [""], "max_gen_toks": 4})  # "" stops nothing
    (expected,) = WftLM(model, tokenizer, max_length=64).generate_until(
        _instances("generate_until", [request]))
    (got,) = WftLM(model, _SilentEos(tokenizer), max_length=64).generate_until(
        _instances("generate_until", [request]))
    assert got == expected.split(tokenizer.decode([tokenizer.eos_token_id]))[0]
