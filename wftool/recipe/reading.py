"""YAML text -> a plain tree of dicts, lists, strings and numbers, or a WftError.

PyYAML alone lets through what later crashes or misleads: bytes that are not UTF-8, integers
past Python's int-string limit, a recursive alias (`a: &x [*x]`), a billion-laughs alias
fan-out, dates and `!!binary` values, and one dict shared by two sections, so an override
of one silently changes both. Every value is copied here into a fresh tree with none of
these, or refused naming the file (or override) and the field.
"""

from __future__ import annotations

import datetime
import math
import re
from pathlib import Path
from typing import Any

import yaml

from wftool.errors import WftError

MAX_RECIPE_BYTES = 1 << 20
MAX_VALUES = 100_000  # scalars and containers, aliases counted each time they are used
MAX_DEPTH = 64
MAX_STRING = 100_000
MAX_INT_BITS = 64


def read_yaml_file(path: Path) -> Any:
    """The plain tree a YAML file holds."""
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise WftError(f"recipe {path} is {size:,} bytes; a recipe is a small YAML file "
                           f"(at most {MAX_RECIPE_BYTES:,} bytes)", "check the file name")
        data = path.read_bytes()
    except OSError as err:
        raise WftError(f"cannot read recipe {path}: {err.strerror or err}") from None
    if b"\0" in data:
        raise WftError(f"recipe {path} is a binary file, not YAML text",
                       "pass a .yaml recipe file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise WftError(f"{path}:{line}:{column}: not UTF-8 text (byte 0x{data[err.start]:02x})",
                       "save the recipe as UTF-8") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, where: str, *, lenient: bool = False) -> Any:
    """Parse YAML text (a file's, or one override value) into a plain tree. `lenient`: text
    that is not valid YAML is returned as the string itself (how override values work)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        if lenient:
            return text
        mark = getattr(err, "problem_mark", None)
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        problem = getattr(err, "problem", None) or str(err)
        raise WftError(f"{at}: invalid YAML: {problem}") from None
    except RecursionError:
        raise WftError(f"{where}: YAML nested too deeply",
                       f"a recipe nests at most {MAX_DEPTH} levels") from None
    except ValueError as err:  # a 5,000-digit integer, a date like 2024-13-45
        if lenient:
            return text
        reason, at = str(err).split(":")[0], where
        digits = re.search(r"\d{4000,}", text)
        if "integer string conversion" in str(err) and digits:
            line = text.count("\n", 0, digits.start()) + 1
            column = digits.start() - (text.rfind("\n", 0, digits.start()) + 1) + 1
            at = f"{where}:{line}:{column}"
            reason = f"an integer of {digits.end() - digits.start():,} digits"
        raise WftError(f"{at}: a value YAML cannot convert ({reason})",
                       "quote it if it is text; numbers must fit in 64 bits") from None
    if lenient and isinstance(value, (datetime.date, datetime.datetime)):
        return text  # `name=2024-01-01` means the text
    return plain_tree(value, where)


def plain_tree(value: Any, where: str) -> Any:
    """A fresh copy of `value` (shared nodes unshared), or a WftError naming the field."""
    budget = [MAX_VALUES]
    return _copy(value, [], set(), budget, where)


def _copy(value: Any, path: list, ancestors: set[int], budget: list[int], where: str) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise WftError(f"{where}: more than {MAX_VALUES:,} values (YAML aliases expand to "
                       "too many copies)", "write the recipe without nested aliases")
    if len(path) > MAX_DEPTH:
        raise WftError(f"{where}: {_dotted(path)} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, (dict, list)):
        if id(value) in ancestors:
            raise WftError(f"{where}: {_dotted(path) or 'the recipe'} contains itself "
                           "(a recursive YAML alias)", "a recipe must be a finite tree: "
                           "replace the alias (*name) inside its own anchor (&name)")
        ancestors = ancestors | {id(value)}
        if isinstance(value, list):
            return [_copy(v, [*path, i], ancestors, budget, where) for i, v in enumerate(value)]
        copied = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise WftError(f"{where}: key {_show(key)} in {_dotted(path) or 'the recipe'} "
                               "is not text (YAML reads true/yes/on/null/numbers as such)",
                               "quote the key")
            copied[key] = _copy(item, [*path, key], ancestors, budget, where)
        return copied
    return _scalar(value, path, where)


def _scalar(value: Any, path: list, where: str) -> Any:
    field = _dotted(path) or "the value"
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise WftError(f"{where}: {field}: an integer of {value.bit_length()} bits; "
                           "numbers must fit in 64 bits")
        return value
    if isinstance(value, float):
        return value  # the schema refuses inf and nan where a number is meant
    if isinstance(value, str):
        if "\0" in value:
            raise WftError(f"{where}: {field} contains a NUL character")
        if len(value) > MAX_STRING:
            raise WftError(f"{where}: {field} is {len(value):,} characters long, over "
                           f"{MAX_STRING:,}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise WftError(f"{where}: {field} contains an invalid character (a lone "
                           "surrogate escape such as \\ud800)") from None
        return value
    if isinstance(value, (datetime.date, datetime.datetime)):
        raise WftError(f"{where}: {field}: YAML read {value} as a date",
                       f"quote it ('{value}') if it is text")
    kind = {bytes: "binary data (!!binary)", set: "a set (!!set)", tuple: "a tuple"}.get(
        type(value), type(value).__name__)
    raise WftError(f"{where}: {field} is {kind}; a recipe holds text, numbers, booleans, "
                   "lists and mappings")


def _dotted(path: list) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else ("." if text else "") + str(part)
    return text


def _show(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        text = repr(value) if not isinstance(value, (dict, list, tuple)) else type(value).__name__
    except ValueError:  # an integer past the int-string conversion limit
        text = f"<integer of {value.bit_length()} bits>"
    return text if len(text) <= 40 else text[:37] + "..."
