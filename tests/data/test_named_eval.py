"""`data.eval`: held-out sources named in the recipe; training then uses every row of
`sources`, and nothing of the eval sources."""

import json

import pytest
from pydantic import ValidationError

from wftool.data.packing import build_stream
from wftool.data.sources import DocumentMixer, eval_documents
from wftool.recipe.schema import DataSource, DataSpec


def _files(tmp_path, n_train=12, n_eval=5):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps({"text": f"train doc {i}"}) + "\n"
                             for i in range(n_train)))
    val.write_text("".join(json.dumps({"text": f"val doc {i}"}) + "\n" for i in range(n_eval)))
    return train, val


def test_training_yields_every_source_row_and_no_eval_row(tmp_path):
    train, val = _files(tmp_path)
    spec = DataSpec(sources=[DataSource(files=[str(train)])],
                    eval=[DataSource(files=[str(val)])])
    mixer = DocumentMixer(spec, "train")
    drawn = [mixer.next_document() for _ in range(36)]  # three epochs
    assert set(drawn) == {f"train doc {i}" for i in range(12)}
    assert all(drawn.count(doc) == 3 for doc in set(drawn))  # no row held out
    # The eval split of that section is the eval file, in row order, once.
    assert list(eval_documents(spec)) == [f"val doc {i}" for i in range(5)]
    eval_mixer = DocumentMixer(spec, "eval")
    assert {eval_mixer.next_document() for _ in range(10)} == {f"val doc {i}" for i in range(5)}


def test_training_stream_of_a_section_with_eval_sources_packs_only_training_rows(
        tmp_path):
    from wftool.model.tokenizer import train_synthetic_tokenizer

    tokenizer = train_synthetic_tokenizer(512)
    train, val = _files(tmp_path)
    spec = DataSpec(sources=[DataSource(files=[str(train)])],
                    eval=[DataSource(files=[str(val)])], seq_len=16)
    stream = build_stream(spec, tokenizer, "train")
    text = tokenizer.decode([t for _ in range(10) for t in stream.next_row()[0]])
    assert "train doc" in text and "val" not in text


def test_eval_sources_and_a_non_default_eval_fraction_are_refused(tmp_path):
    train, val = _files(tmp_path)
    sources = [DataSource(files=[str(train)])]
    with pytest.raises(ValidationError, match="not both"):
        DataSpec(sources=sources, eval=[DataSource(files=[str(val)])], eval_fraction=0.1)
    with pytest.raises(ValidationError, match="not both"):
        DataSpec(sources=sources, eval=[DataSource(files=[str(val)])], eval_fraction=0.0)
    spec = DataSpec(sources=sources, eval=[DataSource(files=[str(val)])])
    assert spec.holds_out and DocumentMixer(spec).holdout_every == 0
    assert not DataSpec(eval_fraction=0).holds_out


def test_task_eval_sources_read_prompt_and_answer_in_row_order(tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"q": f"q{i}", "a": f" a{i}"}) + "\n" for i in range(4)))
    spec = DataSpec(format="task", eval=[DataSource(files=[str(val)], prompt_field="q",
                                                    answer_field="a")])
    assert list(eval_documents(spec)) == [(f"q{i}", f" a{i}") for i in range(4)]
