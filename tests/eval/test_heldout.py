"""Held-out files become the batches training's packing would make, each example once."""

import json

import pytest
import torch

from tests.eval.conftest import packed_rows, read_jsonl
from wftool.data.packing import IGNORE_INDEX
from wftool.errors import WftError
from wftool.eval.heldout import HeldOutSet, file_documents, judged_examples, same_tokens


def test_text_file_is_packed_once_with_positions_restarting_per_document(tokenizer, text_file):
    docs = file_documents(text_file, "text")
    assert len(docs) == 7
    batches = HeldOutSet("text", "f", 40, file=text_file).batches(tokenizer, batch_size=2)
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
    batches = HeldOutSet("task", "f", 32, file=path).batches(tokenizer, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    first = batches[0]
    for i, row in enumerate(read_jsonl(path)[:2]):
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        labels = first["labels"][i]
        assert labels[labels.ne(IGNORE_INDEX)].tolist() == answer + [tokenizer.eos_token_id]
    assert judged_examples(batches) == 3
    assert same_tokens(HeldOutSet("task", "f", 32, file=path).batches(tokenizer, 2, limit=1),
                       batches[:1])


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
