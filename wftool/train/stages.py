"""From a recipe to a running stage: find the inputs, build the objective, train.

Each stage finds the previous stage's `final/` by itself (the stage registry says which:
layerwise <- convert, pretrain <- layerwise or convert, distill <- pretrain), unless
`<stage>.init` says otherwise.
"""

from __future__ import annotations

from pathlib import Path

from wftool.errors import WftError
from wftool.model.checkpoint import load_model_dir
from wftool.model.families import family_for_model_type
from wftool.model.loading import load_source_model, torch_dtype
from wftool.recipe.schema import DataSpec, ModelSpec, Recipe, ResumeSpec, TrainingSpec
from wftool.stage_registry import final_dir, get_stage
from wftool.train.moe_balance import router_balance
from wftool.train.objectives import Distillation, LanguageModeling, LayerwiseDistillation
from wftool.train.remote import fetch_dir, is_remote, stage_url
from wftool.train.trainer import StageRun, Trainer, TrainResult


def find_init(recipe: Recipe, stage: str) -> Path:
    """The directory a stage starts from: `<stage>.init`, else the most recently finished
    output of the stages it may follow (local, or fetched from `sync_to` when only the
    remote copy exists). `wft pipeline` passes the stage before it instead."""
    explicit = getattr(recipe, stage).init
    cache = Path(recipe.stage_dir(stage)) / "init"
    if explicit:
        if is_remote(explicit):
            return _fetch_once(explicit, cache)
        path = Path(explicit).expanduser()
        if not (path / "config.json").exists():
            raise WftError(f"{stage}.init: {explicit} is not a model directory (no config.json)")
        return path
    previous_stages = get_stage(stage).previous
    found = [final_dir(recipe, previous) for previous in previous_stages
             if (final_dir(recipe, previous) / "config.json").exists()]
    if found:  # the most recently finished: an older run of another stage may be there too
        return max(found, key=lambda path: (path / "config.json").stat().st_mtime_ns)
    if recipe.sync_to:
        for previous in previous_stages:
            url = stage_url(recipe.sync_to, recipe.name, previous)
            try:
                return _fetch_once(url, cache)
            except WftError:
                continue
    first = previous_stages[0]
    raise WftError(
        f"{stage} starts from the output of {first}, and {final_dir(recipe, first)} does not "
        "exist",
        f"run `wft {first} <recipe>` first (or `wft pipeline`), or set {stage}.init=DIR",
    )


def _fetch_once(url: str, cache: Path) -> Path:
    """Rank 0 downloads; the other processes wait and read the same copy (each downloading
    into the one cache directory would delete the others' files)."""
    import torch.distributed as dist

    problem = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            fetch_dir(url, cache)
        except WftError as err:
            problem = (err.message, err.hint)
    if dist.is_initialized():
        verdict = [problem]
        dist.broadcast_object_list(verdict, src=0)
        problem = verdict[0]
    if problem is not None:
        raise WftError(*problem)
    return cache


def load_teacher(spec: ModelSpec | str, dtype: str = "auto"):
    """A frozen full-precision model and its family, from a model spec or a hub id or
    directory (loaded in `dtype`, the recipe's `teacher.dtype`)."""
    if isinstance(spec, str):
        path = Path(spec).expanduser()
        if (path / "config.json").exists():
            model, _, meta = load_model_dir(path)
            if meta is not None:
                raise WftError(f"teacher {spec} is a ternary student; a teacher must be full "
                               "precision")
            if dtype != "auto":
                model.to(torch_dtype(dtype))
        else:
            model, _, _ = load_source_model(ModelSpec(name_or_path=spec, dtype=dtype))
    else:
        if dtype != "auto":
            spec = spec.model_copy(update={"dtype": dtype})
        model, _, _ = load_source_model(spec)
    model.requires_grad_(False).eval()
    return model, family_for_model_type(model.config.model_type)


def refuse_random_teacher(recipe: Recipe) -> None:
    """`distill` without `teacher.name_or_path` distils from `model`: refused when that is
    built from a config, i.e. random weights."""
    if recipe.model.config is not None:
        raise WftError(
            "distill: the teacher would be the randomly initialised model built from "
            "model.config; distilling from it teaches the student nothing",
            f"set teacher.name_or_path to a trained full-precision model (`wft pipeline "
            f"{recipe.name}` trains one when teacher.train is set: teacher.name_or_path="
            f"{Path(recipe.output_dir) / recipe.name / 'teacher-sft' / 'final'})",
        )


def _load_student(path: Path):
    model, tokenizer, meta = load_model_dir(path)
    if meta is None:
        raise WftError(f"{path} is a full-precision model; convert it first with `wft convert`")
    return model, tokenizer, meta


def _check_vocab(student, teacher) -> None:
    """Same vocabulary; a unified student may hold one more token, its mask token, past
    the teacher's (distillation then compares the teacher's tokens only)."""
    student_vocab, teacher_vocab = student.config.vocab_size, teacher.config.vocab_size
    mask_id = getattr(student.config, "mask_token_id", None)
    if student_vocab == teacher_vocab + 1 and mask_id == teacher_vocab:
        return
    if student_vocab != teacher_vocab:
        raise WftError(
            f"teacher vocabulary ({teacher.config.vocab_size}) differs from the student's "
            f"({student.config.vocab_size}); logits distillation needs the same tokenizer"
        )


def _train(run: StageRun, console) -> TrainResult:
    trainer = Trainer(run, console)
    trainer.setup()
    return trainer.train()


def run_pretrain(recipe: Recipe, console=None, *, output_dir: Path | None = None,
                 stage_label: str = "pretrain", init: Path | None = None,
                 training: TrainingSpec | None = None, data: DataSpec | None = None,
                 quantize: bool | None = None, training_key: str = "pretrain.training",
                 resume: ResumeSpec | None = None,
                 resume_key: str | None = "pretrain.resume") -> TrainResult:
    """Continued pre-training (CE). With quantization off it trains a full-precision model
    from the recipe's `model` (how a teacher is made)."""
    stage = recipe.pretrain
    quantize = stage.quantize if quantize is None else quantize
    if quantize:
        model, tokenizer, meta = _load_student(init or find_init(recipe, "pretrain"))
    elif init is not None or stage.init:
        model, tokenizer, meta = load_model_dir(init or stage.init)
        if meta is not None:
            raise WftError("pretrain.quantize=false needs a full-precision model as init")
    else:
        model, tokenizer, _ = load_source_model(recipe.model)
        meta = None
    training = training or stage.training
    run = StageRun(
        recipe=recipe, stage=stage_label,
        output_dir=output_dir or Path(recipe.stage_dir("pretrain")),
        model=model, tokenizer=tokenizer,
        objective=LanguageModeling(router_balance(model, training)),
        training=training, data=data or stage.data or recipe.data,
        resume=resume or stage.resume, meta=meta,
        warmup_steps=recipe.quantization.warmup_steps if meta is not None else 0,
        training_key=training_key, resume_key=resume_key,
    )
    return _train(run, console)


def run_layerwise(recipe: Recipe, console=None, *, init: Path | None = None) -> TrainResult:
    stage = recipe.layerwise
    model, tokenizer, meta = _load_student(init or find_init(recipe, "layerwise"))
    teacher, _ = load_teacher(recipe.model, recipe.teacher.dtype)
    _check_vocab(model, teacher)
    if teacher.config.num_hidden_layers != model.config.num_hidden_layers:
        raise WftError("layer-wise distillation needs a teacher with the student's layer count")
    objective = LayerwiseDistillation(teacher, stage, model.config.num_hidden_layers,
                                      router_balance(model, stage.training))
    run = StageRun(
        recipe=recipe, stage="layerwise", output_dir=Path(recipe.stage_dir("layerwise")),
        model=model, tokenizer=tokenizer, objective=objective, training=stage.training,
        data=stage.data or recipe.data, resume=stage.resume, meta=meta,
        warmup_steps=recipe.quantization.warmup_steps, extra_modules=[teacher],
    )
    return _train(run, console)


def run_unified(recipe: Recipe, console=None, *, init: Path | None = None) -> TrainResult:
    """Next-token CE + masked diffusion on the ternary student, after adding its mask token."""
    from wftool.model.mask_token import add_mask_token
    from wftool.train.unified import UnifiedObjective

    stage = recipe.unified
    model, tokenizer, meta = _load_student(init or find_init(recipe, "unified"))
    implementation = model.config._attn_implementation
    if implementation not in ("sdpa", "eager"):
        raise WftError(f"unified: the student's attention implementation {implementation!r} "
                       "cannot take the masks denoising rows need",
                       "load it with sdpa attention (the default)")
    mask_id = add_mask_token(model, tokenizer)
    family = family_for_model_type(model.config.model_type)
    hooks = ()
    if stage.qk_clip_tau:
        from wftool.train.qk_clip import QKClip

        hooks = (QKClip(model, family, stage.qk_clip_tau),)
    objective = UnifiedObjective(stage, mask_id, stage.training.max_steps, student=model,
                                 hooks=hooks, balance=router_balance(model, stage.training))
    meta.diffusion = objective.settings().to_dict()
    run = StageRun(
        recipe=recipe, stage="unified", output_dir=Path(recipe.stage_dir("unified")),
        model=model, tokenizer=tokenizer, objective=objective, training=stage.training,
        data=stage.data or recipe.data, resume=stage.resume, meta=meta,
        warmup_steps=recipe.quantization.warmup_steps,
    )
    return _train(run, console)


def run_distill(recipe: Recipe, console=None, *, teacher_source: str | None = None,
                init: Path | None = None) -> TrainResult:
    stage = recipe.distill
    model, tokenizer, meta = _load_student(init or find_init(recipe, "distill"))
    source = teacher_source or recipe.teacher.name_or_path
    if not source:
        refuse_random_teacher(recipe)
    teacher, teacher_family = load_teacher(source if source else recipe.model,
                                           recipe.teacher.dtype)
    _check_vocab(model, teacher)
    student_family = family_for_model_type(model.config.model_type)
    try:
        objective = Distillation(
            teacher, stage, student_family, teacher_family,
            model.config.num_hidden_layers, teacher.config.num_hidden_layers,
            router_balance(model, stage.training),
        )
    except ValueError as err:
        raise WftError(f"distill.attention_layer: {err}") from None
    run = StageRun(
        recipe=recipe, stage="distill", output_dir=Path(recipe.stage_dir("distill")),
        model=model, tokenizer=tokenizer, objective=objective, training=stage.training,
        data=stage.data or recipe.data, resume=stage.resume, meta=meta,
        warmup_steps=recipe.quantization.warmup_steps, extra_modules=[teacher],
    )
    return _train(run, console)

