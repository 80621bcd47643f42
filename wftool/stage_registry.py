"""The stages of a student's life, in order: the one list the schema, CLI, pipeline, export
and eval read.

A stage has a recipe section of the same name and leaves a Hugging Face style `final/`
directory under `<output_dir>/<name>/<stage>/`. Training stages name the function that runs
them (imported only when run, so `wft --help` stays instant) and the stages whose output
they start from.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from wftool.recipe.schema import Recipe


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str  # the command's --help line
    runner: str | None = None  # "module:function" for training stages; None: not trained
    previous: tuple[str, ...] = ()  # stages whose final/ it starts from, preferred first
    table_label: str = ""  # its row in the pipeline and eval tables

    @property
    def trains(self) -> bool:
        return self.runner is not None

    def run_function(self) -> Callable:
        module, function = self.runner.split(":")
        return getattr(importlib.import_module(module), function)


STUDENT_STAGES: tuple[Stage, ...] = (
    Stage("convert", "Stage 1: insert SubLN and BitLinear into a Hugging Face causal LM.",
          table_label="student after convert"),
    Stage("layerwise", "Stage 1.9: layer-wise hidden-state distillation from the teacher.",
          runner="wftool.train.stages:run_layerwise", previous=("convert",),
          table_label="student after layerwise"),
    Stage("pretrain", "Stage 2: continued pre-training with ternary weights (STE).",
          runner="wftool.train.stages:run_pretrain", previous=("layerwise", "convert"),
          table_label="student after pretrain"),
    Stage("unified", "LM loss + masked diffusion-LM loss in one pass, curriculum, MuonClip.",
          runner="wftool.train.stages:run_unified", previous=("pretrain", "layerwise", "convert"),
          table_label="student after unified"),
    Stage("distill", "Stage 3: logits KL + attention relation distillation from a teacher.",
          runner="wftool.train.stages:run_distill",
          previous=("unified", "pretrain", "layerwise", "convert"),
          table_label="BitDistill student"),
)
# Recipe sections that are not model stages but take stage-relative overrides too.
OTHER_SECTIONS = ("export", "serve", "launch")

_BY_NAME = {stage.name: stage for stage in STUDENT_STAGES}
STUDENT_STAGE_NAMES = tuple(_BY_NAME)
SECTION_NAMES = STUDENT_STAGE_NAMES + OTHER_SECTIONS
TRAINING_STAGES = tuple(s for s in STUDENT_STAGES if s.trains)
DEFAULT_PIPELINE = ("convert", "layerwise", "pretrain", "distill")


def get_stage(name: str) -> Stage:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(_BY_NAME)}") from None


def newest_first() -> tuple[Stage, ...]:
    """Student stages from the last to the first (whose output is the most trained)."""
    return tuple(reversed(STUDENT_STAGES))


def final_dir(recipe: Recipe, stage: str) -> Path:
    """Where a stage's finished model lives (`convert.output` may move convert's)."""
    get_stage(stage)
    if stage == "convert" and recipe.convert.output:
        return Path(recipe.convert.output)
    return Path(recipe.stage_dir(stage)) / "final"
