"""Reading recipes: YAML file -> dotted command-line overrides -> validated Recipe.

Every user mistake becomes a WftError naming the dotted field, the bad value and, for
unknown keys, the closest valid name; validation itself is pydantic's, so overrides are
type-checked by exactly the same models as the file.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from wftool.errors import WftError
from wftool.recipe.reading import parse_yaml, plain_tree, read_yaml_file
from wftool.recipe.schema import STAGES, Recipe

RECIPE_SUFFIXES = (".yaml", ".yml")


def bundled_recipes_dir() -> Path:
    """The recipes shipped with wft: inside the wheel, or the repository's `recipes/`."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "recipes", package.parent / "recipes"):
        if candidate.is_dir():
            return candidate
    return package / "recipes"


def bundled_recipes() -> dict[str, Path]:
    root = bundled_recipes_dir()
    if not root.is_dir():
        return {}
    return {p.stem: p for p in sorted(root.iterdir()) if p.suffix in RECIPE_SUFFIXES}


def resolve_recipe_path(name_or_path: str) -> Path:
    """A recipe file path, or the name of a bundled recipe (`tiny`, `qwen3_4b`, ...)."""
    if not name_or_path.strip() or "\0" in name_or_path:
        raise WftError(f"recipe {name_or_path!r} is not a file name",
                       "`wft recipe list` shows the bundled recipes")
    path = Path(name_or_path).expanduser()
    try:
        if path.is_file():
            return path
        exists = path.exists()
    except OSError as err:  # a name too long for the file system
        raise WftError(f"recipe '{_clip(name_or_path)}': {err.strerror}") from None
    bundled = bundled_recipes()
    stem = path.name.removesuffix(path.suffix) if path.suffix in RECIPE_SUFFIXES else path.name
    if path.parent == Path(".") and stem in bundled:
        return bundled[stem]
    if exists:
        kind = "a directory" if path.is_dir() else "a device or pipe"
        raise WftError(f"recipe '{name_or_path}' is {kind}, not a YAML file")
    hint = _did_you_mean(stem, bundled) or "`wft recipe list` shows the bundled recipes"
    raise WftError(f"recipe '{name_or_path}' not found (no such file or bundled recipe)", hint)


def read_recipe_yaml(path: Path) -> dict[str, Any]:
    raw = read_yaml_file(path)
    if not isinstance(raw, dict):
        raise WftError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    return raw


def override_path(key: str, raw: dict[str, Any], stage: str | None) -> list[str]:
    """Where a dotted override lands: inside the stage's section when that section has the
    key (`training.max_steps` with `wft pretrain` -> `pretrain.training.max_steps`),
    otherwise at the top level (`model.dtype`)."""
    parts = key.split(".")
    if any(not p for p in parts):
        raise WftError(f"override key '{key}' has an empty part")
    if stage is None or parts[0] == stage:
        return parts
    stage_fields = _field_names(_section_model(stage))
    top_fields = _field_names(Recipe)
    stage_raw = raw.get(stage) if isinstance(raw.get(stage), dict) else {}
    if parts[0] in stage_fields and (parts[0] not in top_fields or parts[0] in stage_raw):
        return [stage, *parts]
    if parts[0] in top_fields:
        return parts
    return [stage, *parts]  # unknown here too: the error names the stage section


def apply_overrides(
    raw: dict[str, Any], overrides: list[str], stage: str | None = None
) -> dict[str, str]:
    """Apply `a.b.c=value` overrides in place (values parsed as YAML). Returns the dotted
    path each override landed on, for error messages."""
    landed: dict[str, str] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise WftError(
                f"override '{_clip(item)}' is not of the form key=value",
                "e.g. training.max_steps=100 or data.seq_len=256",
            )
        value = parse_yaml(text, f"override '{_clip(item)}'", lenient=True) if text else None
        path = override_path(key.strip(), raw, stage)
        node = raw
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise WftError(f"override '{_clip(item)}': '{where}' is a value, not a section")
            node = child
        node[path[-1]] = value
        landed[".".join(path)] = item
    return landed


def validate_recipe(
    raw: dict[str, Any], source: str = "recipe", overrides: dict[str, str] | None = None
) -> Recipe:
    raw = plain_tree(raw, source)  # no cycles, shared nodes or unrepresentable values
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        lines = [format_error(e, overrides or {}) for e in err.errors()]
        raise WftError(f"{source} is not a valid recipe:\n  " + "\n  ".join(lines)) from None


def load_recipe(
    name_or_path: str, overrides: list[str] | None = None, stage: str | None = None
) -> Recipe:
    """Read, override and validate a recipe; raises WftError with a clear message."""
    if stage is not None and stage not in STAGES:
        raise ValueError(f"unknown stage {stage}")
    path = resolve_recipe_path(name_or_path)
    raw = read_recipe_yaml(path)
    landed = apply_overrides(raw, list(overrides or []), stage)
    return validate_recipe(raw, str(path), landed)


def format_error(error: dict[str, Any], overrides: dict[str, str]) -> str:
    loc = error["loc"]
    dotted = _dotted(loc)
    origin = _override_origin(dotted, overrides)
    if error["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        choices = _field_names(parent) if parent else set()
        suggestion = _did_you_mean(str(loc[-1]), choices)
        text = f"{dotted}: unknown key" + (f"; did you mean '{suggestion}'?" if suggestion else "")
        if choices and not suggestion:
            text += f" (valid keys: {', '.join(sorted(choices))})"
        return text + origin
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{dotted or 'recipe'}: required field is missing{origin}"
    value = error.get("input")
    if error["type"] == "wft_field":  # a validator naming a field below its own location
        ctx = error["ctx"]
        dotted = ".".join(p for p in (dotted, ctx["field"]) if p)
        origin = _override_origin(dotted, overrides)
        message, value = ctx["message"], ctx["value"]
        shown = "" if value is None else f" (got {_short(value)})"
        return f"{dotted}: {message}{shown}{origin}"
    shown = "" if isinstance(value, dict) else f" (got {_short(value)})"
    return f"{dotted or 'recipe'}: {message}{shown}{origin}"


def _short(value: Any, limit: int = 60) -> str:
    """repr, cut to `limit` characters: a message quotes a value, never a whole document."""
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's int-string limit
        text = f"<integer of {value.bit_length()} bits>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _override_origin(dotted: str, overrides: dict[str, str]) -> str:
    for path, item in overrides.items():
        if dotted == path or dotted.startswith(path + ".") or dotted.startswith(path + "["):
            return f" [from override {_clip(item)}]"
    return ""


def _dotted(loc: tuple) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + str(part)
    return text


def _did_you_mean(word: str, choices) -> str | None:
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _field_names(model: type[BaseModel] | None) -> set[str]:
    if model is None:
        return set()
    return {f.alias or name for name, f in model.model_fields.items()}


def _section_model(stage: str) -> type[BaseModel]:
    return _unwrap_model(Recipe.model_fields[stage].annotation)


def _unwrap_model(annotation) -> type[BaseModel] | None:
    """The BaseModel inside `X`, `X | None`, `list[X]`, `dict[str, X]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, dict):
        for arg in typing.get_args(annotation):
            found = _unwrap_model(arg)
            if found is not None:
                return found
    return None


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The recipe model class at a validation-error location (list indices skipped)."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None:
            return None
        fields = {f.alias or name: f for name, f in model.model_fields.items()}
        if part not in fields:
            return None
        model = _unwrap_model(fields[part].annotation)
    return model
