"""The held-out sets `wft eval` scores: a recipe's eval split, or every example of a file.

A set becomes batches in the layout of `wftool.data.packing` for one tokenizer, so every
model is scored by `evaluate_model` on the batches training evaluates on:
- text: documents joined with EOS into rows of `seq_len` tokens, position ids restarting at
  every document (documents do not attend to each other); every token after a row's first
  is predicted.
- task: prompt + answer (+ EOS) per row, right-padded; only the answer tokens are scored.

Each document is scored at most once. A recipe's eval split is drawn by the mixer training
evaluates with (same order, so the first `data.eval_batches` batches are training's), but
read once: the training readers repeat a finite source forever, and a second epoch would
bring rows that are not even held out (each epoch reshuffles which rows the held-out
indices land on). A recipe that names its held-out sources (`data.eval`) is scored on
those, each read once in row order (`wftool.data.sources.eval_documents`); training's
in-training eval takes its batches from here too, so both score the same batches.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from wftool.data.packing import IGNORE_INDEX, TaskStream, collate_examples, require_eos
from wftool.data.sources import (
    DocumentMixer,
    Reader,
    StreamReader,
    TableReader,
    eval_documents,
    open_reader,
)
from wftool.errors import WftError
from wftool.recipe.schema import DataSource, DataSpec, Recipe
from wftool.train.evaluation import judged_answers

DEFAULT_SEQ_LEN = 512


@dataclass
class SetBatches:
    """A held-out set's batches for one tokenizer. `documents`: the documents (text) or
    examples (task) with tokens in them; `complete`: whether that is all of the set (a whole
    file, or one whole pass over a recipe's finite eval split; never an endless synthetic
    one)."""

    batches: list[dict]
    documents: int
    complete: bool


@dataclass
class HeldOutSet:
    """`text` (loss on every token) or `task` (loss and accuracy on the answer) data: a
    recipe data section's eval split, or a local file read once, in file order."""

    kind: str
    origin: str  # where the examples come from, for the table title and the JSON
    seq_len: int
    data: DataSpec | None = None
    file: Path | None = None

    @property
    def task(self) -> bool:
        return self.kind == "task"

    def batches(self, tokenizer, batch_size: int, limit: int | None = None) -> SetBatches:
        """The set's batches for `tokenizer`: at most `limit` of them (a recipe's split:
        `data.eval_batches` by default), and never a document twice."""
        eos = require_eos(tokenizer)
        task_stream = TaskStream(None, tokenizer, self.seq_len) if self.task else None
        if self.data is not None:
            count = limit or self.data.eval_batches
            documents, complete = _eval_split(self.data, tokenizer, batch_size * count,
                                              None if self.task else self.seq_len)
        else:
            documents, complete, count = file_documents(self.file, self.kind), True, limit
        if self.task:
            examples = [task_stream.encode(prompt, answer) for prompt, answer in documents]
            batches = [collate_examples(examples[i : i + batch_size], task_stream.pad)
                       for i in range(0, len(examples), batch_size)]
            kept = batches[:count] if count else batches
            held = sum(b["input_ids"].shape[0] for b in kept)
        else:
            encoded = _encode_documents(documents, tokenizer)
            batches = _packed_batches(encoded, eos, self.seq_len, batch_size)
            kept = batches[:count] if count else batches
            held = _documents_in(encoded, sum(b["input_ids"].numel() for b in kept))
        return SetBatches(kept, held, complete and len(kept) == len(batches))


class _PassEnded(Exception):
    """A source of the eval split came to its end: what follows would repeat it."""


class _OnePass(Reader):
    """A training reader read once: `_PassEnded` where it would start over. Synthetic
    documents never repeat, so that reader passes through unchanged."""

    def __init__(self, reader: Reader):
        self.reader = reader

    def iter_from(self, start):
        if isinstance(self.reader, TableReader):
            end = len(self.reader.table)
            for index, row, document in self.reader.iter_from(start):
                if index >= end:
                    raise _PassEnded
                yield index, row, document
        elif isinstance(self.reader, StreamReader):
            for index, record in enumerate(self.reader.stream):
                if index >= start:
                    yield index, index, self.reader.row_to_document(record)
            raise _PassEnded
        else:
            yield from self.reader.iter_from(start)


def _eval_split(data: DataSpec, tokenizer, rows: int, seq_len: int | None) -> tuple[list, bool]:
    """(documents, whether the split ended): the eval split's documents in the order training
    evaluates on them, until they fill `rows` packed rows of `seq_len` tokens (text) or make
    `rows` examples (task: `seq_len` None), or every held-out document was drawn once.
    Named held-out sources (`data.eval`) are read in their own order, source by source."""
    if data.eval is not None:
        draw = functools.partial(next, eval_documents(data), None)
    else:
        readers = [_OnePass(open_reader(source, data.format, data.seed))
                   for source in data.sources]
        draw = DocumentMixer(data, "eval", readers=readers).next_document
    documents, tokens = [], 0
    try:
        while (tokens < rows * seq_len) if seq_len else (len(documents) < rows):
            document = draw()
            if document is None:
                raise _PassEnded
            documents.append(document)
            if seq_len:  # the document's tokens and the EOS packing puts after it
                tokens += len(tokenizer(documents[-1], add_special_tokens=False)["input_ids"]) + 1
    except _PassEnded:
        return documents, True
    return documents, False


def heldout_sets(recipe: Recipe | None, text: Path | None = None, task: Path | None = None,
                 seq_len: int | None = None) -> list[HeldOutSet]:
    """The text set and the task set: the files given, else the recipe's eval splits (of
    `data`, and of `distill.data` when that is a task). `seq_len` overrides every set's."""
    from_recipe: dict[str, tuple[str, DataSpec]] = {}
    if recipe is not None:
        for section, data in (("data", recipe.data), ("distill.data", recipe.distill.data)):
            if data is not None and data.holds_out:
                from_recipe.setdefault(data.format, (section, data))
    sets = []
    for kind, file in (("text", text), ("task", task)):
        section, data = from_recipe.get(kind, (None, None))
        length = seq_len or (data.seq_len if data is not None else DEFAULT_SEQ_LEN)
        if file is not None:
            sets.append(HeldOutSet(kind, str(file), length, file=Path(file)))
        elif data is not None:
            split = "eval" if data.eval is not None else "eval split"
            sets.append(HeldOutSet(kind, f"{recipe.name}: {section} ({split})", length,
                                   data=data.model_copy(update={"seq_len": length})))
    return sets


def file_documents(path: Path, kind: str) -> list:
    """Every document (text) or (prompt, answer) pair (task) of a .txt/.jsonl/.parquet file;
    txt files hold one document per paragraph, JSONL/Parquet rows use the `text` or the
    `prompt` / `answer` columns."""
    if not path.is_file():
        raise WftError(f"--{kind} {path}: no such file")
    reader = open_reader(DataSource(files=[str(path)]), kind, seed=0)
    documents = [reader.row_to_document(reader.table[i]) for i in range(len(reader.table))]
    documents = [d for d in documents if d] if kind == "text" else documents
    if not documents:
        raise WftError(f"--{kind} {path} holds no {kind} examples")
    return documents


def _encode_documents(documents: list[str], tokenizer) -> list[list[int]]:
    if not documents:
        return []
    return [list(ids) for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]]


def _packed_batches(encoded: list[list[int]], eos: int, seq_len: int,
                    batch_size: int) -> list[dict]:
    """Documents (token ids) packed once into rows, as PackedTextStream packs them; the
    last, shorter row is a batch of its own."""
    import torch

    tokens: list[int] = []
    starts: set[int] = set()
    for ids in encoded:
        starts.add(len(tokens))
        tokens.extend(ids + [eos])
    rows = []
    for begin in range(0, len(tokens), seq_len):
        ids = tokens[begin : begin + seq_len]
        positions, position = [], 0
        for index in range(begin, begin + len(ids)):
            position = 0 if index in starts else position
            positions.append(position)
            position += 1
        rows.append((ids, positions))
    if not rows:
        return []
    groups = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    if len(groups[-1][-1][0]) < seq_len:  # the short last row cannot share a batch
        short = groups[-1].pop()
        groups = [g for g in groups if g] + [[short]]
    batches = []
    for group in groups:
        input_ids = torch.tensor([ids for ids, _ in group], dtype=torch.long)
        batches.append({"input_ids": input_ids, "labels": input_ids.clone(),
                        "position_ids": torch.tensor([p for _, p in group], dtype=torch.long)})
    return batches


def _documents_in(encoded: list[list[int]], tokens: int) -> int:
    """How many of the packed documents start within the first `tokens` packed tokens."""
    count, start = 0, 0
    for ids in encoded:
        if start >= tokens:
            break
        count, start = count + 1, start + len(ids) + 1
    return count


def scored_tokens(batches: list[dict]) -> int:
    """Target tokens the loss averages over (every labelled position after the first)."""
    return sum(int(b["labels"][:, 1:].ne(IGNORE_INDEX).sum()) for b in batches)


def judged_examples(batches: list[dict]) -> int:
    """Task examples whose answer has a token besides the closing EOS (what accuracy judges)."""
    return len(judged_answers(batches))


def same_tokens(a: list[dict], b: list[dict]) -> bool:
    """Whether two batch lists hold the same token ids and targets (padding aside)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x["labels"].shape != y["labels"].shape or not x["labels"].equal(y["labels"]):
            return False
        mask = x.get("attention_mask")
        if mask is not None and not y.get("attention_mask", mask).equal(mask):
            return False
        keep = mask.bool() if mask is not None else slice(None)
        if not x["input_ids"][keep].equal(y["input_ids"][keep]):
            return False
    return True
