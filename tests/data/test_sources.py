import json

import numpy as np
import pytest

from tests.data.readers import counting_reader
from wftool.data.sources import DocumentMixer, open_reader
from wftool.data.synthetic import SyntheticLanguage, WordClassTask
from wftool.errors import WftError
from wftool.recipe.schema import DataSource, DataSpec


def _spec(n_sources=1, weights=None, eval_fraction=0.0):
    weights = weights or [1.0] * n_sources
    return DataSpec(sources=[DataSource(synthetic=True, weight=w) for w in weights],
                    eval_fraction=eval_fraction)


def test_weighted_mixing_follows_weights():
    spec = _spec(2, [3.0, 1.0])
    mixer = DocumentMixer(spec, readers=[counting_reader("a"), counting_reader("b")])
    docs = [mixer.next_document() for _ in range(4000)]
    share = sum(d.startswith("a") for d in docs) / len(docs)
    assert share == pytest.approx(0.75, abs=0.03)


def test_held_out_documents_never_reach_training_and_ranks_are_disjoint():
    spec = _spec(eval_fraction=0.1)
    train = [DocumentMixer(spec, "train", r, 2, readers=[counting_reader()]) for r in (0, 1)]
    seen = [{train[r].next_document() for _ in range(200)} for r in (0, 1)]
    held = DocumentMixer(spec, "eval", readers=[counting_reader()])
    held_out = {held.next_document() for _ in range(30)}
    assert not seen[0] & seen[1]
    assert not (seen[0] | seen[1]) & held_out
    assert all(int(d) % 10 == 0 for d in held_out)


def test_reshuffled_epochs_never_train_on_held_out_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(10)))
    spec = DataSpec(sources=[DataSource(files=[str(path)])], eval_fraction=0.2)
    train = DocumentMixer(spec, "train")
    trained = {train.next_document() for _ in range(8 * 5)}  # five epochs, reshuffled
    held = DocumentMixer(spec, "eval")
    held_out = {held.next_document() for _ in range(2 * 5)}
    assert len(held_out) == 2 and len(trained) == 8
    assert not trained & held_out


def test_mixer_state_round_trips_through_json():
    spec = _spec(2, [1.0, 1.0])
    mixer = DocumentMixer(spec, readers=[counting_reader("a"), counting_reader("b")])
    for _ in range(7):
        mixer.next_document()
    state = json.loads(json.dumps(mixer.state_dict()))
    expected = [mixer.next_document() for _ in range(10)]
    other = DocumentMixer(spec, readers=[counting_reader("a"), counting_reader("b")])
    other.load_state_dict(state)
    assert [other.next_document() for _ in range(10)] == expected


def test_local_jsonl_and_text_files(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(5)))
    source = DataSource(files=[str(tmp_path / "*.jsonl")], text_field="body")
    reader = open_reader(source, "text", seed=0)
    docs = {doc for _, doc in zip(range(5), (d for _, _, d in reader.iter_from(0)))}
    assert docs == {f"doc {i}" for i in range(5)}  # one epoch: every row once, shuffled
    (tmp_path / "b.txt").write_text("first para\nline two\n\nsecond para\n")
    reader = open_reader(DataSource(files=[str(tmp_path / "b.txt")]), "text", seed=0)
    assert {d for _, d in zip(range(2), (d for _, _, d in reader.iter_from(0)))} == {
        "first para\nline two", "second para"}


def test_compressed_text_and_jsonl_files_read_as_their_inner_format(tmp_path):
    import bz2
    import gzip

    (tmp_path / "notes.txt.gz").write_bytes(gzip.compress(b"first para\nline two\n\nsecond\n"))
    reader = open_reader(DataSource(files=[str(tmp_path / "notes.txt.gz")]), "text", seed=0)
    assert {d for _, d in zip(range(2), (d for _, _, d in reader.iter_from(0)))} == {
        "first para\nline two", "second"}
    rows = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3))
    (tmp_path / "rows.jsonl.bz2").write_bytes(bz2.compress(rows.encode()))
    reader = open_reader(DataSource(files=[str(tmp_path / "rows.jsonl.bz2")]), "text", seed=0)
    assert {d for _, d in zip(range(3), (d for _, _, d in reader.iter_from(0)))} == {
        "doc 0", "doc 1", "doc 2"}
    (tmp_path / "odd.gz").write_bytes(gzip.compress(b"x"))
    with pytest.raises(WftError, match="must all be one of.*got .gz"):
        open_reader(DataSource(files=[str(tmp_path / "odd.gz")]), "text", 0)


def test_parquet_task_file(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"q": ["a?", "b?"], "a": ["x", "y"]}).to_parquet(
        str(tmp_path / "t.parquet"))
    source = DataSource(files=[str(tmp_path / "t.parquet")], prompt_field="q", answer_field="a")
    reader = open_reader(source, "task", seed=0)
    got = {d for _, d in zip(range(2), (d for _, _, d in reader.iter_from(0)))}
    assert got == {("a?", "x"), ("b?", "y")}


def test_missing_column_and_missing_files_are_clear(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(WftError, match="no column 'text'.*content"):
        open_reader(DataSource(files=[str(tmp_path / "a.jsonl")]), "text", 0)
    with pytest.raises(WftError, match="matches no file"):
        open_reader(DataSource(files=[str(tmp_path / "nope*.jsonl")]), "text", 0)
    (tmp_path / "c.csv").write_text("a,b\n")
    with pytest.raises(WftError, match="must all be one of"):
        open_reader(DataSource(files=[str(tmp_path / "c.csv")]), "text", 0)


def test_synthetic_language_entropy_matches_empirical_rate():
    language = SyntheticLanguage()
    nexts, probs = language._chain
    rng = np.random.default_rng(0)
    index = {w: i for i, w in enumerate(language.words)}
    words = language.sample_words(rng, 60_000)
    state, total = 0, 0.0
    for word in words:
        target = index[word]
        total -= np.log(probs[state, list(nexts[state]).index(target)])
        state = target
    assert total / len(words) == pytest.approx(language.entropy_rate_nats(), rel=0.03)


def test_word_class_task_is_balanced_and_deterministic():
    task = WordClassTask()
    answers = [task.example(0, i)[1] for i in range(400)]
    assert 0.4 < answers.count(" left") / 400 < 0.6
    assert task.example(3, 5) == WordClassTask().example(3, 5)
    prompt, answer = task.example(0, 1)
    last = prompt.removesuffix(" ->").split()[-1]
    assert answer.strip() == ("left", "right")[task.word_classes[last]]


def test_classification_rows_become_prompt_and_label_text(tmp_path):
    rows = [{"premise": "p1", "hypothesis": "h1", "label": 2}]
    (tmp_path / "nli.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    source = DataSource(
        files=[str(tmp_path / "nli.jsonl")], answer_field="label",
        prompt_template="Premise: {premise}\nHypothesis: {hypothesis}\nAnswer:",
        label_names=["entailment", "neutral", "contradiction"],
    )
    _, _, document = next(open_reader(source, "task", 0).iter_from(0))
    assert document == ("Premise: p1\nHypothesis: h1\nAnswer:", " contradiction")
    bad = source.model_copy(update={"label_names": ["yes"]})
    with pytest.raises(WftError, match="no entry in label_names"):
        next(open_reader(bad, "task", 0).iter_from(0))


def test_a_split_with_no_documents_is_an_error_not_a_hang(tmp_path):
    """One row held out (eval_fraction 0.1 holds out row 0): training would scan forever."""
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"text": "the only row"}) + "\n")
    spec = DataSpec(sources=[DataSource(files=[str(path)])], eval_fraction=0.1)
    assert DocumentMixer(spec, "eval").next_document() == "the only row"
    with pytest.raises(WftError, match="has no train documents .eval_fraction holds out "
                                       "every 10th row"):
        DocumentMixer(spec, "train").next_document()
