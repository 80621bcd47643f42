"""The held-out sets `wft eval` scores: a recipe's eval split, or every example of a file.

A set becomes batches in the layout of `wftool.data.packing` for one tokenizer, so every
model is scored by `evaluate_model` on the batches training evaluates on:
- text: documents joined with EOS into rows of `seq_len` tokens, position ids restarting at
  every document (documents do not attend to each other); every token after a row's first
  is predicted.
- task: prompt + answer (+ EOS) per row, right-padded; only the answer tokens are scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wftool.data.packing import IGNORE_INDEX, TaskStream, collate_examples
from wftool.data.sources import open_reader
from wftool.errors import WftError
from wftool.recipe.schema import DataSource, DataSpec, Recipe
from wftool.train.evaluation import eval_batches

DEFAULT_SEQ_LEN = 512


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

    def batches(self, tokenizer, batch_size: int, limit: int | None = None) -> list[dict]:
        """The set's batches for `tokenizer`; at most `limit` of them when given."""
        if self.data is not None:
            count = limit or self.data.eval_batches
            data = self.data.model_copy(update={"eval_batches": count})
            return eval_batches(data, tokenizer, batch_size)
        documents = file_documents(self.file, self.kind)
        if self.task:
            stream = TaskStream(None, tokenizer, self.seq_len)  # only its encoding is used
            examples = [stream.encode(prompt, answer) for prompt, answer in documents]
            batches = [collate_examples(examples[i : i + batch_size], stream.pad)
                       for i in range(0, len(examples), batch_size)]
        else:
            batches = _packed_batches(documents, tokenizer, self.seq_len, batch_size)
        return batches[:limit] if limit else batches


def heldout_sets(recipe: Recipe | None, text: Path | None = None, task: Path | None = None,
                 seq_len: int | None = None) -> list[HeldOutSet]:
    """The text set and the task set: the files given, else the recipe's eval splits (of
    `data`, and of `distill.data` when that is a task). `seq_len` overrides every set's."""
    from_recipe: dict[str, tuple[str, DataSpec]] = {}
    if recipe is not None:
        for section, data in (("data", recipe.data), ("distill.data", recipe.distill.data)):
            if data is not None and data.eval_fraction > 0:
                from_recipe.setdefault(data.format, (section, data))
    sets = []
    for kind, file in (("text", text), ("task", task)):
        section, data = from_recipe.get(kind, (None, None))
        length = seq_len or (data.seq_len if data is not None else DEFAULT_SEQ_LEN)
        if file is not None:
            sets.append(HeldOutSet(kind, str(file), length, file=Path(file)))
        elif data is not None:
            sets.append(HeldOutSet(kind, f"{recipe.name}: {section} (eval split)", length,
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


def _packed_batches(documents: list[str], tokenizer, seq_len: int, batch_size: int) -> list:
    """Documents packed once into rows, as PackedTextStream packs them; the last, shorter row
    is a batch of its own."""
    import torch

    if tokenizer.eos_token_id is None:
        raise WftError("the tokenizer has no EOS token, which packing needs between documents")
    tokens: list[int] = []
    starts: set[int] = set()
    for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        starts.add(len(tokens))
        tokens.extend(list(ids) + [tokenizer.eos_token_id])
    rows = []
    for begin in range(0, len(tokens), seq_len):
        ids = tokens[begin : begin + seq_len]
        positions, position = [], 0
        for index in range(begin, begin + len(ids)):
            position = 0 if index in starts else position
            positions.append(position)
            position += 1
        rows.append((ids, positions))
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


def scored_tokens(batches: list[dict]) -> int:
    """Target tokens the loss averages over (every labelled position after the first)."""
    return sum(int(b["labels"][:, 1:].ne(IGNORE_INDEX).sum()) for b in batches)


def judged_examples(batches: list[dict]) -> int:
    """Task examples whose answer has a token besides the closing EOS (what accuracy judges)."""
    return sum(int(b["labels"][:, 1:].ne(IGNORE_INDEX).sum(-1).ge(2).sum()) for b in batches)


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
