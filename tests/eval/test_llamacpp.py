"""GGUF exports scored through llama.cpp: the same numbers as a direct computation from
llama.cpp's logits, close to the PyTorch student's, and refused when tokens disagree; the
shared llama.cpp plumbing (`wftool.runtime.llamacpp`)."""

import numpy as np
import pytest
import torch
from rich.console import Console

from tests.conftest import require_llamacpp
from tests.eval.conftest import direct_task, direct_text_nll, export_gguf, read_jsonl
from wftool.commands.evaluate import EvalOptions, run_eval
from wftool.errors import WftError
from wftool.eval.heldout import file_documents
from wftool.model.checkpoint import load_ternary_model, save_model_dir
from wftool.model.tokenizer import train_synthetic_tokenizer

quiet = Console(quiet=True)
# How far llama.cpp's mean NLL may sit from the PyTorch student's: TQ types quantize
# activations per 256-block (Q8_K) instead of per token, F16 keeps them in float.
LOSS_TOLERANCE = {"tq2_0": 5e-3, "f16": 5e-3}  # measured: 5e-4 for both
# wft's llama.cpp numbers vs the same sequences run apart from it (measured: 1e-7, the loss
# reduction in float32): a context that kept the previous sequence, or logits read one
# position off, move the mean NLL by tenths of a nat.
REFERENCE_TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def ggufs(student_dir, tmp_path_factory):
    require_llamacpp()
    root = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(student_dir, t, root / f"student-{t}.gguf") for t in ("tq2_0", "f16")}


def _fresh_context_logits(path):
    """llama.cpp's logits for one sequence, computed apart from LlamaCppModel's way: a fresh
    context per sequence (no reset()), each position's logits read from llama.cpp's C API
    (no `scores` buffer). The sequence is one batched prompt, as `wft eval` runs it: fed one
    token at a time (the KV-cache decode path), llama.cpp rounds differently (F16: logits
    move by up to 3e-4), and the int8 activations of TQ types can turn such differences
    into flipped codes (see tests/eval/conftest.py). llama-cpp-python's own echo logprobs
    are no reference: in 0.3.36 they score each token with the distribution that follows
    it (off by one)."""
    import llama_cpp

    def logits_of(ids):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, n_threads_batch=1,
                              logits_all=True, verbose=False)
        try:
            llm.eval(ids)
            rows = [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, i),
                                          shape=(llm.n_vocab(),)).copy()
                    for i in range(len(ids))]
        finally:
            llm.close()
        return torch.from_numpy(np.stack(rows).astype(np.float32))
    return logits_of


@pytest.mark.parametrize("export_type", ["tq2_0", "f16"])
def test_gguf_numbers_equal_llamacpp_logits_and_track_the_student(
        export_type, ggufs, student_dir, tokenizer, text_file, task_file):
    path = ggufs[export_type]
    options = EvalOptions(text=text_file, task=task_file, seq_len=48, batch_size=3)
    student, gguf = run_eval([str(student_dir), str(path)], options, quiet).models
    assert gguf["backend"] == "llama.cpp" and gguf["weights"] == export_type.upper()
    logits_of = _fresh_context_logits(path)
    nll, tokens = direct_text_nll(logits_of, tokenizer, file_documents(text_file, "text"), 48)
    task = direct_task(logits_of, tokenizer, read_jsonl(task_file))
    assert gguf["text_tokens"] == tokens == student["text_tokens"]
    assert gguf["text_loss"] == pytest.approx(nll / tokens, abs=REFERENCE_TOLERANCE)
    assert gguf["task_loss"] == pytest.approx(task.nll / task.tokens, abs=REFERENCE_TOLERANCE)
    task.assert_accuracy(gguf["task_accuracy"])
    limit = LOSS_TOLERANCE[export_type]
    assert abs(gguf["text_loss"] - student["text_loss"]) < limit
    assert abs(gguf["task_loss"] - student["task_loss"]) < limit


def test_gguf_with_another_tokenizer_is_refused(student_dir, tmp_path, text_file):
    require_llamacpp()
    model, _, meta = load_ternary_model(student_dir)
    other = train_synthetic_tokenizer(512, n_documents=300)  # same size, other merges
    save_model_dir(model, other, tmp_path / "retokenized", meta)
    path = export_gguf(tmp_path / "retokenized", "f16", tmp_path / "other.gguf")
    options = EvalOptions(text=text_file, seq_len=48)
    with pytest.raises(WftError, match="llama.cpp tokenizes the text data"):
        run_eval([str(student_dir), str(path)], options, quiet)


def test_gguf_alone_uses_its_own_tokenizer(ggufs, student_dir, text_file):
    options = EvalOptions(text=text_file, seq_len=48)
    (alone,) = run_eval([str(ggufs["f16"])], options, quiet).models
    _, beside = run_eval([str(student_dir), str(ggufs["f16"])], options, quiet).models
    assert alone["text_tokens"] == beside["text_tokens"]
    assert alone["text_loss"] == pytest.approx(beside["text_loss"], rel=1e-6)


def test_decode_failures_are_user_errors(ggufs, text_file, monkeypatch):
    """llama_decode failing mid-run (out of memory, no KV slot) is a WftError with the fix."""
    import llama_cpp

    def failing_eval(self, tokens):
        raise RuntimeError("llama_decode returned -3")

    monkeypatch.setattr(llama_cpp.Llama, "eval", failing_eval)
    options = EvalOptions(text=text_file, seq_len=48)
    with pytest.raises(WftError, match="llama.cpp failed on a sequence") as caught:
        run_eval([str(ggufs["f16"])], options, quiet)
    assert "llama_decode returned -3" in caught.value.message
    assert "--seq-len" in caught.value.hint


def test_runtime_reads_the_trained_context_and_explains_failures(ggufs, tmp_path,
                                                                 monkeypatch):
    import sys

    from wftool.runtime.llamacpp import gguf_context_length, import_llama, open_llama

    assert gguf_context_length(ggufs["tq2_0"]) == 128  # the student's max_position_embeddings
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + bytes(64))
    assert gguf_context_length(broken) is None
    assert gguf_context_length(tmp_path / "missing.gguf") is None
    with pytest.raises(WftError, match="llama.cpp cannot load") as caught:
        open_llama(broken, 64, 1)
    assert "BitNet.cpp" in caught.value.hint
    llm = open_llama(ggufs["f16"], 64, 1)
    try:
        assert llm.n_vocab() == 512
    finally:
        llm.close()
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(WftError, match="serving needs llama-cpp-python") as caught:
        import_llama("serving", alternative="use --backend torch")
    assert caught.value.hint.startswith("pip install 'wftool[llamacpp]'")
    assert caught.value.hint.endswith(", or use --backend torch")
