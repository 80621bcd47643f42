"""Value types of the recipe schema: numbers with bounds, names, paths.

The bounds are where a value stops being a setting and starts to hang a run or exhaust
memory (a 10^8-token sequence, a float of 1e30, `true` read as the integer 1): such values
are refused when the recipe is read, naming the field, instead of failing hours later.
"""

from __future__ import annotations

import re
import string
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_core import PydanticCustomError

# Absolute caps; the model's own context (max_position_embeddings) bounds seq_len further.
MAX_STEPS = 10**9
MAX_SEQ_LEN = 1 << 20
MAX_BATCH = 1 << 16
MAX_BATCH_TOKENS = 1 << 22  # micro_batch_size * seq_len: one micro-batch
MAX_EVAL_TOKENS = 1 << 26  # eval_batches * micro_batch_size * seq_len, all held in memory
MAX_SEED = 2**63 - 1
MAX_NAME = 100
MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255


def field_error(field: str, message: str, value=None) -> PydanticCustomError:
    """A validation error about `field` (dotted, relative to where the validator runs);
    load.format_error prints it as `<location>.<field>: <message> (got <value>)`."""
    return PydanticCustomError("wft_field", "{field}: {message}",
                               {"field": field, "message": message, "value": value})


def _not_bool(value):
    if isinstance(value, bool):
        raise PydanticCustomError(
            "bool_not_number",
            "expected a number, not a boolean (YAML reads true/false/yes/no/on/off as "
            "booleans)")
    return value


NotBool = BeforeValidator(_not_bool)

Int = Annotated[int, NotBool]
Float = Annotated[float, NotBool]
Count = Annotated[int, NotBool, Field(ge=1, le=MAX_STEPS)]  # steps, intervals
Steps = Annotated[int, NotBool, Field(ge=0, le=MAX_STEPS)]  # 0 = off
Seed = Annotated[int, NotBool, Field(ge=0, le=MAX_SEED)]
Weight = Annotated[float, NotBool, Field(ge=0.0, le=1e9)]  # loss weights, 0 = off
PositiveWeight = Annotated[float, NotBool, Field(gt=0.0, le=1e6)]
Fraction = Annotated[float, NotBool, Field(ge=0.0, le=1.0)]


def _path_text(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty_path", "must not be empty")
    encoded = value.encode("utf-8", "surrogatepass")
    if len(encoded) > MAX_PATH_BYTES:
        raise PydanticCustomError("path_too_long",
                                  "path is {size} bytes, over the {limit} a file system takes",
                                  {"size": len(encoded), "limit": MAX_PATH_BYTES})
    for part in value.replace("\\", "/").split("/"):
        if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT_BYTES:
            raise PydanticCustomError(
                "path_too_long", "the path component '{part}...' is over {limit} bytes, "
                "longer than a file name may be", {"part": part[:24], "limit":
                                                   MAX_COMPONENT_BYTES})
    return value


# A file, directory, hub id or URL: non-empty, and short enough for a file system.
PathText = Annotated[str, AfterValidator(_path_text)]

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _run_name(value: str) -> str:
    if not _NAME.fullmatch(value) or len(value) > MAX_NAME:
        raise PydanticCustomError(
            "run_name", "must be one directory name of at most {limit} characters: letters, "
            "digits, _ . - (not starting with . or -)", {"limit": MAX_NAME})
    return value


# The run name becomes one directory, <output_dir>/<name>: one safe path component, never
# `.`, `..` or hidden (a leading dot), never mistaken for an option (a leading dash).
RunName = Annotated[str, AfterValidator(_run_name)]


def _prompt_template(template: str) -> str:
    """Named columns only (`{premise}`): anything else fails every example at the first
    training step."""
    try:
        fields = [(name, conversion) for _, name, _, conversion
                  in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"not a valid template ({err}); write {{{{ }}}} for literal braces") \
            from None
    for name, conversion in fields:
        if not name.isidentifier():
            raise ValueError(f"'{{{name}}}' is not a column name; write {{column}}, and "
                             "{{ }} for literal braces")
        if conversion not in (None, "r", "s", "a"):
            raise ValueError(f"'!{conversion}' is not a conversion (!r, !s or !a)")
    return template


PromptTemplate = Annotated[str, AfterValidator(_prompt_template)]
