"""What `wft eval` evaluates: command-line items -> models, and the recipe whose data is the
default held-out data. A recipe stands for everything its runs left: the teacher, each
stage's final/, the BitNet-SFT baseline and GGUF exports under runs/<name>/.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from wftool.errors import WftError
from wftool.model.checkpoint import model_directory
from wftool.recipe.schema import ModelSpec, Recipe
from wftool.stage_registry import STUDENT_STAGES, final_dir

# What a recipe run leaves besides the student stages, in table order (`wft pipeline`'s labels).
TEACHER_DIRS = (("teacher-base", "teacher (FP, pre-trained)"),
                ("teacher-sft", "teacher (FP16-SFT)"))


@dataclass
class EvalTarget:
    """One model to evaluate: a model directory, a .gguf file, or a model a recipe names
    (then `spec`, loaded as training loads it: revision, tokenizer and dtype included; a
    teacher directory has `teacher_dtype`, the recipe's `teacher.dtype`, as distill loads it)."""

    label: str
    location: str
    backend: str  # "torch" or "llama.cpp"
    found: bool = False  # found by a recipe scan: skipped with a note if it cannot run
    spec: ModelSpec | None = None
    teacher_dtype: str | None = None


def resolve_sources(items: list[str]) -> tuple[list[EvalTarget], Recipe | None]:
    """The models named on the command line (recipes expand to everything they produced)
    and the recipe whose data is the default held-out data."""
    from wftool.recipe.load import load_recipe

    overrides = [i for i in items if "=" in i and not Path(i).exists()]
    sources = [i for i in items if i not in overrides]
    if not sources:
        raise WftError("name a recipe, a model directory or a .gguf file to evaluate")
    targets: list[EvalTarget] = []
    data_recipe: Recipe | None = None
    saved_recipe: Path | None = None
    for item in sources:
        kind, path = _source_kind(item)
        if kind == "gguf":
            targets.append(EvalTarget(item, str(path), "llama.cpp"))
        elif kind == "model":
            targets.append(EvalTarget(item, str(path), "torch"))
            if saved_recipe is None and (path / "recipe.yaml").exists():
                saved_recipe = path / "recipe.yaml"
        else:
            recipe = load_recipe(item, overrides)
            data_recipe = data_recipe or recipe
            targets.extend(recipe_targets(recipe))
    if data_recipe is None and saved_recipe is not None:
        data_recipe = load_recipe(str(saved_recipe), overrides)
    elif overrides and data_recipe is None:
        raise WftError(f"override {overrides[0]!r} applies to a recipe, and none is given",
                       "overrides change the recipe's data, e.g. `wft eval tiny "
                       "data.eval_batches=2`")
    return targets, data_recipe


def _source_kind(item: str) -> tuple[str, Path]:
    from wftool.recipe.load import RECIPE_SUFFIXES, bundled_recipes, resolve_recipe_path

    path = Path(item).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise WftError(f"{item}: no such GGUF file")
        return "gguf", path
    if path.is_dir():
        model_dir = model_directory(path)
        if model_dir is not None:
            return "model", model_dir
        raise WftError(f"{item} is a directory without config.json, not a model directory",
                       "pass a stage's final/ directory, a .gguf file or a recipe")
    if path.is_file() and path.suffix.lower() not in RECIPE_SUFFIXES:
        raise WftError(f"{item}: cannot evaluate a {path.suffix or 'suffix-less'} file",
                       "wft eval takes recipes (.yaml), model directories and .gguf files")
    try:
        return "recipe", resolve_recipe_path(item)
    except WftError:
        close = difflib.get_close_matches(path.name, list(bundled_recipes()), n=1, cutoff=0.6)
        raise WftError(f"{item} is not a .gguf file, a model directory, a recipe file or a "
                       "bundled recipe name",
                       f"did you mean '{close[0]}'?" if close else
                       "`wft recipe list` shows the bundled recipes") from None


def _named_teacher(recipe: Recipe) -> list[EvalTarget]:
    """The teacher the recipe names, else its original model (unless built from a config)."""
    named = recipe.teacher.name_or_path
    if named:
        if (Path(named).expanduser() / "config.json").exists():  # loaded as distill does
            return [EvalTarget("teacher", named, "torch", True,
                               teacher_dtype=recipe.teacher.dtype)]
        spec = ModelSpec(name_or_path=named, dtype=recipe.teacher.dtype)
        return [EvalTarget("teacher", named, "torch", True, spec)]
    if recipe.model.name_or_path:
        return [EvalTarget("original model (FP)", recipe.model.name_or_path, "torch", True,
                           recipe.model)]
    return []


def recipe_targets(recipe: Recipe) -> list[EvalTarget]:
    """Everything a recipe's runs left: teacher, each stage's final/, the BitNet-SFT
    baseline, and GGUF exports under runs/<name>/."""

    root = Path(recipe.output_dir) / recipe.name
    made = [EvalTarget(label, str(root / name / "final"), "torch", True)
            for name, label in TEACHER_DIRS if (root / name / "final" / "config.json").exists()]
    teacher = [] if made else _named_teacher(recipe)  # none trained by `wft pipeline`
    for stage in STUDENT_STAGES:
        path = final_dir(recipe, stage.name)
        if (path / "config.json").exists():
            made.append(EvalTarget(stage.table_label, str(path), "torch", True))
    baseline = root / "baseline" / "sft" / "final"
    if (baseline / "config.json").exists():
        made.append(EvalTarget("BitNet-SFT baseline", str(baseline), "torch", True))
    ggufs = sorted(p for p in root.rglob("*.gguf") if not p.name.startswith("."))
    if recipe.export.output and Path(recipe.export.output).is_file():
        ggufs.append(Path(recipe.export.output))
    for path in dict.fromkeys(ggufs):
        made.append(EvalTarget(f"GGUF {path.name}", str(path), "llama.cpp", True))
    if not made:
        raise WftError(f"recipe {recipe.name} has produced no model yet (nothing in {root})",
                       f"run `wft pipeline {recipe.name}` (or `wft convert`) first, or pass "
                       "model directories and .gguf files")
    return teacher + made
