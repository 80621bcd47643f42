"""Held-out files and recipe eval splits become the batches training's packing would make,
each example once."""

import json

import pytest
import torch

from tests.eval.conftest import packed_rows, read_jsonl
from wftool.data.packing import IGNORE_INDEX, build_stream
from wftool.data.sources import DocumentMixer
from wftool.errors import WftError
from wftool.eval.heldout import HeldOutSet, file_documents, judged_examples, same_tokens
from wftool.recipe.schema import DataSource, DataSpec
from wftool.train.evaluation import (
    accuracy_basis,
    accuracy_cell,
    accuracy_notes,
    answer_accuracy,
    eval_batches,
    majority_floor,
)


def test_text_file_is_packed_once_with_positions_restarting_per_document(tokenizer, text_file):
    docs = file_documents(text_file, "text")
    assert len(docs) == 7
    held = HeldOutSet("text", "f", 40, file=text_file).batches(tokenizer, batch_size=2)
    assert (held.documents, held.complete) == (7, True)
    batches = held.batches
    rows = [r for b in batches for r in b["input_ids"].tolist()]
    positions = [p for b in batches for p in b["position_ids"].tolist()]
    expected = packed_rows(tokenizer, docs, 40)
    assert rows == [[t for seg in segments for t in seg] for segments in expected]
    assert positions == [[p for seg in segments for p in range(len(seg))] for segments in expected]
    assert all(len(r) == 40 for r in rows[:-1]) and len(rows[-1]) < 40
    assert batches[-1]["input_ids"].shape[0] == 1  # the short row is a batch of its own
    assert all(b["labels"].equal(b["input_ids"]) for b in batches)


def test_task_file_scores_answers_only(tokenizer, tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"prompt": "kiza pa ->", "answer": " left"}, {"prompt": "vo ->", "answer": " right"},
            {"prompt": "zi ->", "answer": " left"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batches = HeldOutSet("task", "f", 32, file=path).batches(tokenizer, batch_size=2).batches
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    first = batches[0]
    for i, row in enumerate(read_jsonl(path)[:2]):
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        labels = first["labels"][i]
        assert labels[labels.ne(IGNORE_INDEX)].tolist() == answer + [tokenizer.eos_token_id]
    assert judged_examples(batches) == 3
    first = HeldOutSet("task", "f", 32, file=path).batches(tokenizer, 2, limit=1)
    assert same_tokens(first.batches, batches[:1])
    assert (first.documents, first.complete) == (2, False)


def _split(tmp_path, fmt, n_docs=20):
    """A data section over a 20-row file holding out every 4th document: 5 held out."""
    path = tmp_path / f"{fmt}.jsonl"
    words = ["kiza", "pa", "povo", "vo", "zafi", "zi", "lu", "domilu", "sabula", "nibo"]
    rows = []
    for i in range(n_docs):
        text = " ".join(words[(i + k) % len(words)] for k in range(3 + i % 7)) + f" {i}"
        rows.append({"text": text} if fmt == "text" else {"prompt": text, "answer": f" {i}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataSpec(format=fmt, sources=[DataSource(files=[str(path)])], seq_len=16,
                    eval_fraction=0.25, eval_batches=2)


@pytest.mark.parametrize("fmt", ["text", "task"])
def test_recipe_eval_split_is_read_once_however_many_batches_are_asked(fmt, tokenizer,
                                                                       tmp_path):
    data = _split(tmp_path, fmt)
    # Training's eval stream repeats the source forever: after the 5 held-out documents it
    # brings the same rows again (another epoch's order), which would count them twice.
    mixer = DocumentMixer(data, "eval")
    drawn = [mixer.next_document() for _ in range(10)]
    held_out = drawn[:5]
    assert len(set(map(str, held_out))) == 5
    assert set(map(str, drawn[5:])) == set(map(str, held_out))

    split = HeldOutSet(fmt, "r", 16, data=data)
    held = split.batches(tokenizer, batch_size=2, limit=100)
    assert (held.documents, held.complete) == (5, True)
    if fmt == "task":
        assert [b["input_ids"].shape[0] for b in held.batches] == [2, 2, 1]
        answers = [b["labels"][r][b["labels"][r].ne(IGNORE_INDEX)].tolist()[:-1]
                   for b in held.batches for r in range(b["labels"].shape[0])]
        assert answers == [tokenizer(a, add_special_tokens=False)["input_ids"]
                           for _, a in held_out]
    else:
        rows = [r for b in held.batches for r in b["input_ids"].tolist()]
        assert rows == [[t for seg in segments for t in seg]
                        for segments in packed_rows(tokenizer, held_out, 16)]
    # Asked for fewer than the split holds: training's own first batches, not the whole split.
    first = split.batches(tokenizer, batch_size=2, limit=1)
    assert not first.complete and 0 < first.documents < 5
    assert same_tokens(first.batches, eval_batches(data.model_copy(update={"eval_batches": 1}),
                                                   tokenizer, 2))
    assert same_tokens(first.batches, [build_stream(data, tokenizer, "eval").next_batch(2)])


def test_same_tokens_ignores_padding_only():
    ids = torch.tensor([[5, 6, 7, 0]])
    batch = {"input_ids": ids, "labels": torch.tensor([[-100, 6, 7, -100]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    padded_otherwise = dict(batch, input_ids=torch.tensor([[5, 6, 7, 9]]))
    other_token = dict(batch, input_ids=torch.tensor([[4, 6, 7, 0]]))
    assert same_tokens([batch], [padded_otherwise])
    assert not same_tokens([batch], [other_token])
    assert not same_tokens([batch], [batch, batch])


def test_bad_files_are_named(tmp_path, tokenizer):
    with pytest.raises(WftError, match="no such file"):
        file_documents(tmp_path / "missing.txt", "text")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(WftError, match="no column 'prompt'"):
        file_documents(wrong, "task")
    csv = tmp_path / "data.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(WftError, match="must all be one of"):
        file_documents(csv, "text")


def _task_batches(answers: list[list[int]], eos: int = 2, batch_size: int = 4) -> list[dict]:
    """Task batches laid out as collate_examples lays them out: a 2-token prompt, the answer,
    EOS, right padding; only the answer and the EOS are labelled."""
    rows = [[10, 11] + answer + [eos] for answer in answers]
    width = max(map(len, rows))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, row in enumerate(rows):
        labels[i, 2 : len(row)] = ids[i, 2 : len(row)]
    return [{"input_ids": ids[i : i + batch_size], "labels": labels[i : i + batch_size]}
            for i in range(0, len(rows), batch_size)]


def test_majority_floor_is_the_accuracy_of_always_answering_the_most_frequent_answer():
    """7 of 10 answers are A (two tokens), 3 are B: answering A every time scores 70 %, and
    the tables say so. An answer that is only its EOS is not judged, so not counted."""
    a, b = [5, 6], [7]
    batches = _task_batches([a, b, a, a, b, a, a, [], a, b, a])
    assert majority_floor(batches) == {"examples": 10, "majority_accuracy": 0.7}
    assert judged_examples(batches) == 10
    assert majority_floor([]) == {}

    # A model that answers A whatever the prompt: exactly the floor.
    correct = judged = 0
    for batch in batches:
        logits = torch.zeros(*batch["labels"].shape, 16)
        logits[:, 1, a[0]] = logits[:, 2, a[1]] = 1.0  # predictions for answer tokens 1, 2
        c, j = answer_accuracy(logits, batch["labels"])
        correct, judged = correct + c, judged + j
    assert (correct, judged) == (7, 10)

    floor = majority_floor(batches)
    rows = [{"model": "one-class", "task_accuracy": 0.7, **floor},
            {"model": "also one-class", "task_accuracy": 0.7, **floor},
            {"model": "one better", "task_accuracy": 0.8, **floor},
            {"model": "learned", "task_accuracy": 1.0, **floor}]
    assert accuracy_cell(rows[0]) == "70.0 (n=10, floor 70.0)"
    assert accuracy_cell({"task_accuracy": None}) == "-"
    floor_note, tie_note = accuracy_notes(rows)
    assert floor_note.startswith("one-class, also one-class and one better are at the "
                                 "majority-class floor (70.0 % of 10 examples")
    assert "may answer one class for everything" in floor_note
    assert tie_note == ("tie: one-class and also one-class score the same task accuracy "
                        "(70.0 %, 7 of 10 examples)")
    assert accuracy_notes(rows[3:]) == []


def test_accuracy_basis_is_said_once_only_when_every_row_shares_it():
    same = [{"task_accuracy": 0.9, "examples": 512, "majority_accuracy": 0.555},
            {"task_accuracy": 1.0, "examples": 512, "majority_accuracy": 0.555},
            {"task_accuracy": None}]
    assert accuracy_basis(same) == ("task acc %: 512 examples judged; majority-class floor "
                                    "55.5 %")
    assert [accuracy_cell(r, shared=True) for r in same] == ["90.0", "100.0", "-"]
    other = same + [{"task_accuracy": 0.5, "examples": 10, "majority_accuracy": 0.7}]
    assert accuracy_basis(other) is None
    assert accuracy_cell(other[-1]) == "50.0 (n=10, floor 70.0)"
