"""A source reader for tests: document `index` is whatever `make(index)` returns."""

from wftool.data.sources import Reader


class FunctionReader(Reader):
    def __init__(self, make):
        self.make = make

    def iter_from(self, start):
        index = start
        while True:
            yield index, index, self.make(index)
            index += 1


def list_reader(docs) -> FunctionReader:
    """The documents of `docs`, repeated forever."""
    return FunctionReader(lambda i: docs[i % len(docs)])


def counting_reader(tag: str = "") -> FunctionReader:
    """Documents named after their index: "a0", "a1", ..."""
    return FunctionReader(lambda i: f"{tag}{i}")
