"""Checks across recipe sections: each stage's batch against its data, and every data
section and distillation setting against the model built from `model.config`.

Each value is fine alone; together they can exceed the model's context, hold more tokens
than memory does, or name a layer the model lacks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from wftool.recipe.fields import MAX_BATCH_TOKENS, MAX_EVAL_TOKENS, field_error

if TYPE_CHECKING:
    from wftool.recipe.schema import DataSpec, Recipe, TrainingSpec


def check_recipe_limits(recipe: Recipe) -> None:
    """Raise a pydantic error naming the dotted field of the first problem."""
    for data_key, data in _data_sections(recipe):
        _check_context(recipe, data_key, data)
    for training_key, training, data_key, data in _training_runs(recipe):
        _check_tokens(training_key, training, data_key, data)
    _check_distill(recipe)


def _data_sections(recipe: Recipe) -> list[tuple[str, DataSpec]]:
    sections = [("data", recipe.data)]
    for stage in ("layerwise", "pretrain", "unified", "distill"):
        data = getattr(recipe, stage).data
        if data is not None:
            sections.append((f"{stage}.data", data))
    return sections


def _training_runs(recipe: Recipe) -> list[tuple[str, TrainingSpec, str, DataSpec]]:
    """(training key, training, data key, data) of every run a recipe can start."""
    runs = []
    for stage in ("layerwise", "pretrain", "unified", "distill"):
        section = getattr(recipe, stage)
        data_key, data = (f"{stage}.data", section.data) if section.data else ("data",
                                                                             recipe.data)
        runs.append((f"{stage}.training", section.training, data_key, data))
    plan = recipe.teacher.train
    if plan is not None:  # the pipeline's teacher: pre-training on data, then the task
        task_key, task = (("distill.data", recipe.distill.data) if recipe.distill.data
                          else ("data", recipe.data))
        runs.append(("teacher.train.pretrain", plan.pretrain, "data", recipe.data))
        runs.append(("teacher.train.finetune", plan.finetune, task_key, task))
    return runs


def _check_context(recipe: Recipe, key: str, data: DataSpec) -> None:
    shape = recipe.model.shape
    if shape is not None and data.seq_len > shape.max_position_embeddings:
        raise field_error(
            f"{key}.seq_len",
            f"longer than the model's context (model.config.max_position_embeddings = "
            f"{shape.max_position_embeddings}); lower it or raise max_position_embeddings",
            data.seq_len)


def _check_tokens(training_key: str, training: TrainingSpec, data_key: str,
                  data: DataSpec) -> None:
    tokens = training.micro_batch_size * data.seq_len
    if tokens > MAX_BATCH_TOKENS:
        raise field_error(
            f"{training_key}.micro_batch_size",
            f"{training.micro_batch_size} rows x {data_key}.seq_len {data.seq_len} = "
            f"{tokens:,} tokens per micro-batch, over {MAX_BATCH_TOKENS:,}; lower it and "
            "raise grad_accum", training.micro_batch_size)
    held = tokens * data.eval_batches if data.holds_out else 0
    if held > MAX_EVAL_TOKENS:
        raise field_error(
            f"{data_key}.eval_batches",
            f"{data.eval_batches} batches of {tokens:,} tokens ({training_key}) = {held:,} "
            f"held-out tokens kept in memory, over {MAX_EVAL_TOKENS:,}; lower it",
            data.eval_batches)


def _check_distill(recipe: Recipe) -> None:
    shape = recipe.model.shape
    if shape is None:
        return
    stage = recipe.distill
    if not -shape.num_layers <= stage.attention_layer < shape.num_layers:
        raise field_error(
            "distill.attention_layer",
            f"the model has {shape.num_layers} layers (model.config.num_hidden_layers): use "
            f"0 to {shape.num_layers - 1}, or -1 to -{shape.num_layers} from the end",
            stage.attention_layer)
    for width in (shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim):
        if width % stage.relation_heads:
            raise field_error(
                "distill.relation_heads",
                f"must divide the width of the model's Q/K/V projections "
                f"({shape.num_heads * shape.head_dim} and {shape.num_kv_heads * shape.head_dim})",
                stage.relation_heads)
