"""GGUF exports scored through llama.cpp: the same numbers as a direct computation from
llama.cpp's logits, close to the PyTorch student's, and refused when tokens disagree."""

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


@pytest.fixture(scope="module")
def ggufs(student_dir, tmp_path_factory):
    require_llamacpp()
    root = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(student_dir, t, root / f"student-{t}.gguf") for t in ("tq2_0", "f16")}


def _llamacpp_logits(path):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=128, n_threads=1, logits_all=True, verbose=False)

    def logits_of(ids):
        llm.reset()
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    return llm, logits_of


@pytest.mark.parametrize("export_type", ["tq2_0", "f16"])
def test_gguf_numbers_equal_llamacpp_logits_and_track_the_student(
        export_type, ggufs, student_dir, tokenizer, text_file, task_file):
    path = ggufs[export_type]
    options = EvalOptions(text=text_file, task=task_file, seq_len=48, batch_size=3)
    student, gguf = run_eval([str(student_dir), str(path)], options, quiet).models
    assert gguf["backend"] == "llama.cpp" and gguf["weights"] == export_type.upper()
    llm, logits_of = _llamacpp_logits(path)
    try:
        nll, tokens = direct_text_nll(logits_of, tokenizer, file_documents(text_file, "text"), 48)
        task_nll, task_tokens, right, judged = direct_task(logits_of, tokenizer,
                                                           read_jsonl(task_file))
    finally:
        llm.close()
    assert gguf["text_tokens"] == tokens == student["text_tokens"]
    assert gguf["text_loss"] == pytest.approx(nll / tokens, rel=1e-6)
    assert gguf["task_loss"] == pytest.approx(task_nll / task_tokens, rel=1e-6)
    assert gguf["task_accuracy"] == right / judged
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
