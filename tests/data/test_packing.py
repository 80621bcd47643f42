"""Packing, position ids, task batches and resumable data order."""

import json

import pytest
import torch

from tests.conftest import tiny_llama
from wftool.data.packing import (
    IGNORE_INDEX,
    PackedTextStream,
    TaskStream,
    build_stream,
    model_inputs,
)
from tests.data.readers import list_reader
from wftool.data.sources import DocumentMixer
from wftool.recipe.schema import DataSpec


class CharTokenizer:
    """One token per character ('a' = 1, ...), EOS = 0: packing is easy to check by eye."""

    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        if isinstance(texts, str):
            return {"input_ids": [ord(c) - 96 for c in texts]}
        return {"input_ids": [[ord(c) - 96 for c in t] for t in texts]}


def _stream(docs, seq_len, fmt="text"):
    spec = DataSpec(seq_len=seq_len, eval_fraction=0.0, format=fmt)
    mixer = DocumentMixer(spec, readers=[list_reader(docs)])
    cls = TaskStream if fmt == "task" else PackedTextStream
    return cls(mixer, CharTokenizer(), seq_len)


def test_rows_are_documents_joined_by_eos_with_restarting_positions():
    stream = _stream(["abc", "de", "fghij"], seq_len=4)
    batch = stream.next_batch(3)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 10]]
    # Positions restart after every EOS, and a document cut by a row restarts at 0 too.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]
    assert torch.equal(batch["labels"], batch["input_ids"])


def test_stream_state_resumes_exactly():
    stream = _stream(["abc", "de", "fghij", "klm"], seq_len=5)
    stream.next_batch(2)
    state = json.loads(json.dumps(stream.state_dict()))  # plain data: survives JSON
    expected = [stream.next_batch(2)["input_ids"] for _ in range(3)]
    resumed = _stream(["abc", "de", "fghij", "klm"], seq_len=5)
    resumed.load_state_dict(state)
    got = [resumed.next_batch(2)["input_ids"] for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_packed_position_ids_keep_documents_apart_in_the_model():
    """Position ids reach the model: a packed row gives each document its solo logits."""
    model = tiny_llama()
    first, second = torch.randint(1, 128, (5,)), torch.randint(1, 128, (7,))
    batch = {
        "input_ids": torch.cat([first, second])[None],
        "position_ids": torch.cat([torch.arange(5), torch.arange(7)])[None],
    }
    with torch.no_grad():
        packed = model(**model_inputs(batch)).logits[0]
        alone = model(second[None], use_cache=False).logits[0]
    torch.testing.assert_close(packed[5:], alone, rtol=1e-4, atol=1e-5)


def test_task_batches_put_loss_on_answer_only():
    stream = _stream([("abc", "de")], seq_len=16, fmt="task")
    batch = stream.next_batch(2)
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 0]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 3 + [4, 5, 0]
    assert batch["attention_mask"][0].tolist() == [1] * 6


def test_task_prompt_is_cut_from_the_left_with_one_warning_naming_the_fix():
    stream = _stream([("abcdefgh", "xy"), ("ab", "c")], seq_len=6, fmt="task")
    with pytest.warns(UserWarning) as caught:
        batch = stream.next_batch(4)
        stream.next_batch(4)  # more cut examples: no second warning
    assert batch["input_ids"][0].tolist() == [6, 7, 8, 24, 25, 0]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 3 + [24, 25, 0]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "of 4 read so far, 2 had the start of their prompt cut" in message
    assert "longer than data.seq_len 6 tokens" in message
    assert "raise data.seq_len (e.g. data.seq_len=11" in message
    assert (stream.seen, stream.cut, stream.skipped) == (8, 4, 0)


def test_an_answer_that_does_not_fit_is_skipped_never_cut():
    stream = _stream([("ab", "cdefgh"), ("ab", "c")], seq_len=6, fmt="task")
    with pytest.warns(UserWarning, match=r"2 were skipped \(the answer alone does not fit\)"):
        batch = stream.next_batch(2)
    # "cdefgh" + EOS is 7 tokens: those examples are dropped, the others fill the batch.
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [1, 2, 3, 0]]
    assert (stream.seen, stream.cut, stream.skipped) == (4, 0, 2)


def test_a_stream_whose_answers_never_fit_is_a_user_error():
    from wftool.errors import WftError

    stream = _stream([("ab", "cdefgh")], seq_len=6, fmt="task")
    with pytest.raises(WftError, match="no task example fits data.seq_len 6"):
        stream.next_batch(1)


def test_examples_that_fit_warn_nothing():
    import warnings

    stream = _stream([("abc", "de")], seq_len=6, fmt="task")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stream.next_batch(4)
        assert stream.encode("abc", "de")[0] == [1, 2, 3, 4, 5, 0]


def test_task_batches_pad_on_the_right():
    stream = _stream([("ab", "c"), ("abcd", "e")], seq_len=16, fmt="task")
    batch = stream.next_batch(2)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert batch["labels"][0, 4:].tolist() == [IGNORE_INDEX] * 2


def test_synthetic_stream_is_deterministic_and_has_document_breaks():
    from wftool.model.tokenizer import train_synthetic_tokenizer

    tokenizer = train_synthetic_tokenizer(512)
    a = build_stream(DataSpec(seq_len=64), tokenizer).next_batch(4)
    b = build_stream(DataSpec(seq_len=64), tokenizer).next_batch(4)
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert (a["input_ids"] == tokenizer.eos_token_id).any()


def test_a_tokenizer_without_eos_is_a_user_error():
    from wftool.errors import WftError

    class NoEos(CharTokenizer):
        eos_token_id = None
        name_or_path = "my-tokenizer"

    spec = DataSpec(seq_len=8, eval_fraction=0.0)
    mixer = DocumentMixer(spec, readers=[list_reader(["ab"])])
    for cls in (PackedTextStream, TaskStream):
        with pytest.raises(WftError, match="tokenizer my-tokenizer has no EOS token"):
            cls(mixer, NoEos(), 8)


def test_rows_and_batches_too_long_to_build_are_refused():
    """Recipes bound seq_len when read; streams built from options or copied specs (eval's
    --seq-len) are checked here, instead of packing for minutes."""
    from wftool.errors import WftError
    from wftool.recipe.fields import MAX_SEQ_LEN

    with pytest.raises(WftError, match="seq_len 100000000 is outside"):
        build_stream(DataSpec().model_copy(update={"seq_len": 100_000_000}), CharTokenizer())
    stream = _stream(["abc"], seq_len=MAX_SEQ_LEN)
    with pytest.raises(WftError, match="over 4,194,304"):
        stream.next_batch(8)
