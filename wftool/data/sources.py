"""Where documents come from: hub data sets, local files, or the synthetic language.

Each source is read by index (`Reader.iter_from(start)`), so a run's data position is just a
number per source and resuming replays exactly the documents an uninterrupted run would see.
Documents are held out for evaluation by the row they come from (so a reshuffled second
epoch never trains on a held-out row), and split between ranks by index. A data section
that names its held-out sources (`data.eval`) trains on every row of `sources` instead, and
evaluates on those sources, each read once in row order (`eval_documents`).
"""

from __future__ import annotations

import glob
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from wftool.data.synthetic import mixed_dialect_document, word_class_task
from wftool.errors import WftError
from wftool.recipe.schema import DataSource, DataSpec

Document = str | tuple[str, str]  # text, or (prompt, answer)

_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
             ".parquet": "parquet"}
# Compressed text and JSON files: `datasets` decompresses them as it reads.
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def _format_suffix(file: str) -> str:
    """".txt" for notes.txt and notes.txt.gz: the suffix that says what the file holds."""
    suffixes = [s.lower() for s in Path(file).suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in _COMPRESSED and suffixes[-2] != ".parquet":
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


class Reader:
    """Documents of one source by raw index; `iter_from` yields (index, row, document), where
    `row` names the underlying record: equal rows are the same document in every epoch."""

    def iter_from(self, start: int) -> Iterator[tuple[int, int, Document]]:
        raise NotImplementedError


class SyntheticReader(Reader):
    def __init__(self, fmt: str, seed: int):
        self.fmt, self.seed, self.task = fmt, seed, word_class_task()

    def iter_from(self, start):
        index = start
        while True:
            if self.fmt == "task":
                yield index, index, self.task.example(self.seed, index)
            else:
                yield index, index, mixed_dialect_document(self.seed, index)
            index += 1


class TableReader(Reader):
    """A map-style data set, reshuffled every epoch (seeded), repeated forever."""

    def __init__(self, table, fmt: str, source: DataSource, seed: int):
        if len(table) == 0:
            raise WftError(f"data source {_describe(source)} is empty")
        self.table, self.seed = table, seed
        self.rows = len(table)
        self.row_to_document = _row_converter(table.column_names, fmt, source)
        self._epoch, self._order = -1, None

    def _row(self, index: int) -> int:
        n = len(self.table)
        epoch, offset = divmod(index, n)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n)
        return int(self._order[offset])

    def iter_from(self, start):
        index = start
        while True:
            row = self._row(index)
            yield index, row, self.row_to_document(self.table[row])
            index += 1


class StreamReader(Reader):
    """A streamed data set: resuming skips the documents already seen."""

    def __init__(self, stream, fmt: str, source: DataSource):
        self.stream = stream
        self.row_to_document = _row_converter(stream.column_names, fmt, source)
        self.source = source
        self.rows: int | None = None  # known after the first full pass

    def iter_from(self, start):
        index = 0
        while True:
            produced = False
            # Every pass reads the stream in the same order: a record's row is its position.
            for row, record in enumerate(self.stream):
                produced = True
                if index >= start:
                    yield index, row, self.row_to_document(record)
                index += 1
            if not produced:
                raise WftError(f"data source {_describe(self.source)} is empty")
            self.rows = row + 1


def _describe(source: DataSource) -> str:
    if source.dataset:
        return source.dataset + (f" ({source.subset})" if source.subset else "")
    return "synthetic" if source.synthetic else ", ".join(source.files or [])


def _row_converter(columns, fmt: str, source: DataSource):
    if fmt == "task":
        needed = [source.answer_field]
        if source.prompt_template is None:
            needed.append(source.prompt_field)
    else:
        needed = [source.text_field]
    if columns is not None:
        missing = [c for c in needed if c not in columns]
        if missing:
            raise WftError(
                f"data source {_describe(source)} has no column {missing[0]!r}; "
                f"columns: {', '.join(columns)}",
                "set text_field (or prompt_field / answer_field) in the data source",
            )
    if fmt == "task":
        return lambda row: (_prompt(row, source), _answer(row, source))
    return lambda row: str(row[source.text_field]).strip()


def _prompt(row: dict, source: DataSource) -> str:
    if source.prompt_template is None:
        return str(row[source.prompt_field])
    try:
        return source.prompt_template.format(**row)
    except KeyError as err:
        raise WftError(
            f"prompt_template of {_describe(source)} names column {err}, which rows lack"
        ) from None


def _answer(row: dict, source: DataSource) -> str:
    value = row[source.answer_field]
    if source.label_names is None:
        return str(value)
    try:
        return " " + source.label_names[int(value)]
    except (IndexError, ValueError, TypeError):
        raise WftError(
            f"label {value!r} of {_describe(source)} has no entry in label_names "
            f"({len(source.label_names)} names)"
        ) from None


def expand_files(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if not matches:
            raise WftError(f"data file {pattern!r} matches no file")
        files.extend(matches)
    return files


def open_reader(source: DataSource, fmt: str, seed: int) -> Reader:
    """The reader for one recipe data source."""
    if source.synthetic:
        return SyntheticReader(fmt, seed)
    import datasets

    try:
        if source.files:
            files = expand_files(source.files)
            suffixes = {_format_suffix(f) for f in files}
            builders = {_BUILDERS.get(s) for s in suffixes}
            if None in builders or len(builders) != 1:
                raise WftError(
                    f"data files must all be one of {', '.join(sorted(_BUILDERS))} (text and "
                    f"JSON also compressed: {', '.join(_COMPRESSED)}); "
                    f"got {', '.join(sorted(s or '(no suffix)' for s in suffixes))}"
                )
            builder = builders.pop()
            extra = {"sample_by": "paragraph"} if builder == "text" else {}
            data = datasets.load_dataset(
                builder, data_files=files, split="train", streaming=source.streaming, **extra
            )
        else:
            data = datasets.load_dataset(
                source.dataset, source.subset, split=source.split, streaming=source.streaming
            )
    except WftError:
        raise
    except (OSError, ValueError, FileNotFoundError) as err:
        raise WftError(f"cannot load data source {_describe(source)}: {err}") from None
    if source.streaming:
        return StreamReader(data, fmt, source)
    return TableReader(data, fmt, source, seed)


class DocumentMixer:
    """Weighted mix of sources, one split ("train" or "eval") of one rank's share.

    Its state (mixing RNG and next index per source) is all a resumed run needs.
    """

    def __init__(
        self, spec: DataSpec, split: str = "train", rank: int = 0, world_size: int = 1,
        readers: list[Reader] | None = None,
    ):
        named = spec.eval is not None  # held-out sources of their own: nothing to hold out
        self.sources = spec.eval if named and split == "eval" else spec.sources
        self.readers = readers or [open_reader(s, spec.format, spec.seed) for s in self.sources]
        weights = np.array([s.weight for s in self.sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.holdout_every = (round(1 / spec.eval_fraction)
                              if spec.eval_fraction > 0 and not named else 0)
        self.named_eval = named
        self.split, self.rank, self.world_size = split, rank, world_size
        self.rng = np.random.default_rng([spec.seed, 0 if split == "train" else 1, rank])
        self.positions = [0] * len(self.readers)
        self._iterators: list[Iterator | None] = [None] * len(self.readers)

    def _wanted(self, index: int, row: int) -> bool:
        if self.named_eval and self.split == "eval":
            return True
        held_out = self.holdout_every > 0 and row % self.holdout_every == 0
        if self.split == "eval":
            return held_out
        return not held_out and index % self.world_size == self.rank

    def next_document(self) -> Document:
        choice = int(self.rng.choice(len(self.readers), p=self.weights))
        if self._iterators[choice] is None:
            self._iterators[choice] = self.readers[choice].iter_from(self.positions[choice])
        skipped = 0
        for index, row, document in self._iterators[choice]:
            if self._wanted(index, row):
                self.positions[choice] = index + 1
                return document
            skipped += 1
            if skipped > self._skip_limit(choice):
                self._none_wanted(choice)
        raise WftError("data source ended unexpectedly")

    def _skip_limit(self, choice: int) -> int:
        """Documents to pass over before concluding this split of a source is empty: a
        few epochs of a table (each epoch reshuffles which indices a rank gets), else a
        few hold-out periods."""
        period = max(self.holdout_every, 1) * self.world_size
        rows = getattr(self.readers[choice], "rows", None)
        if rows is not None:
            return (self.world_size + 2) * max(rows, period) + 1000
        return 10 * period + 10_000

    def _none_wanted(self, choice: int) -> None:
        source = _describe(self.sources[choice]) if choice < len(self.sources) else "data"
        held = ("data.eval names the held-out sources" if self.named_eval
                else f"eval_fraction holds out every {self.holdout_every}th row"
                if self.holdout_every else "eval_fraction is 0: nothing is held out")
        whose = f" for rank {self.rank} of {self.world_size}" if self.world_size > 1 else ""
        raise WftError(f"data source {source} has no {self.split} documents{whose} ({held})",
                       "change data.eval_fraction, or add documents to the source")

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "positions": list(self.positions)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.positions = list(state["positions"])
        self._iterators = [None] * len(self.readers)


def eval_documents(spec: DataSpec) -> Iterator[Document]:
    """The documents of a data section's named held-out sources (`spec.eval`): each source
    read once, one after the other, in row order (synthetic: without end). Empty text
    documents are left out: they hold no tokens to score."""
    for source in spec.eval or []:
        reader = open_reader(source, spec.format, spec.seed)
        if isinstance(reader, TableReader):
            records = (reader.table[i] for i in range(len(reader.table)))
        elif isinstance(reader, StreamReader):
            records = iter(reader.stream)
        else:
            yield from (document for _, _, document in reader.iter_from(0))
            return
        for record in records:
            document = reader.row_to_document(record)
            if spec.format == "task" or document:
                yield document
