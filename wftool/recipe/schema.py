"""The recipe: one YAML file per model family/size, validated by these pydantic models.

Top-level sections describe the model, its teacher, quantization and data; one section per
stage (`convert`, `layerwise`, `pretrain`, `unified`, `distill`, `export`, `serve`, `launch`)
holds that stage's settings. Every model forbids unknown keys, so a typo is an error.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from wftool.recipe.fields import (
    MAX_BATCH,
    MAX_SEQ_LEN,
    Count,
    Float,
    Fraction,
    Int,
    NotBool,
    PathText,
    PositiveWeight,
    PromptTemplate,
    RunName,
    Seed,
    Steps,
    Weight,
)
from wftool.stage_registry import DEFAULT_PIPELINE, SECTION_NAMES, STUDENT_STAGE_NAMES

SCHEMA_VERSION = 1
STAGES = SECTION_NAMES  # recipe sections that dotted overrides may resolve in
PipelineStageName = Literal[STUDENT_STAGE_NAMES + ("export",)]
Beta = Annotated[Float, Field(ge=0.0, lt=1.0)]


class Section(BaseModel):
    # No inf or nan anywhere a number is meant.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSpec(Section):
    """The full-precision model to convert: a hub id / local directory, or a config to build."""

    name_or_path: PathText | None = Field(
        None, description="Hugging Face hub id, local directory, or .gguf file "
        "(`package:<python package>/<file>` for a file an installed package ships).")
    gguf_file: PathText | None = Field(
        None, description="A GGUF file inside name_or_path (directory or hub repo), loaded "
        "through transformers' GGUF reader, dequantized to `dtype` (extra: gguf-source).")
    config: dict[str, Any] | None = Field(
        None,
        description="Build a randomly initialised model from this Hugging Face config "
        "(must contain `model_type`) instead of loading weights.",
    )
    tokenizer: PathText | None = Field(
        None,
        description="Tokenizer hub id or directory (default: name_or_path); `synthetic` trains "
        "a byte-level BPE on wft's synthetic language.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype when loading; `auto` keeps the checkpoint's (float32 "
        "for a GGUF file, whose tensors are dequantized)."
    )
    seed: Seed = Field(0, description="Seed for weights built from `config`.")
    _shape: Any = PrivateAttr(None)  # model_config.ModelShape of `config`, once checked

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.name_or_path is None) == (self.config is None):
            raise ValueError("set exactly one of `name_or_path` or `config`")
        if self.config is not None:
            if "model_type" not in self.config:
                raise ValueError("`config` needs a `model_type` (e.g. llama, qwen3)")
            if self.tokenizer is None:
                raise ValueError("a model built from `config` needs `tokenizer` (e.g. synthetic)")
            if self.gguf_file is not None:
                raise ValueError("`gguf_file` names a file inside `name_or_path`; a model built "
                                 "from `config` has none")
            from wftool.recipe.model_config import check_model_config

            self._shape = check_model_config(self.config, self.tokenizer)
        else:
            self._shape = None
        return self

    @property
    def shape(self):
        """The checked shape of a model built from `config` (None for `name_or_path`)."""
        return self._shape


class TeacherSpec(Section):
    """The full-precision teacher used by `layerwise` and `distill`."""

    name_or_path: PathText | None = Field(
        None,
        description="Hub id or directory of the task fine-tuned full-precision teacher for "
        "`distill`; empty = the recipe's original `model`.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    train: TeacherTraining | None = Field(
        None,
        description="`wft pipeline` first trains its own teacher: full-precision pre-training "
        "of `model` on `data`, then fine-tuning on the distill task.",
    )


class QuantizationSpec(Section):
    """BitNet b1.58: ternary absmean weights, per-token absmax int8 activations."""

    weights: Literal["ternary_absmean"] = "ternary_absmean"
    activations: Literal["int8_absmax_per_token"] = "int8_absmax_per_token"
    warmup_steps: Steps = Field(
        0, description="Ramp from latent to ternary weights over this many optimizer "
        "steps of the student's whole training: convert starts it at 0, each stage continues "
        "from the mix its input reached (0 = off: ternary from the start)."
    )
    q_sparsity: Float = Field(
        0.0, ge=0.0, lt=1.0, description="Q-Sparse: share of each token's activations zeroed "
        "(smallest |x|) before every quantized matmul, in training and in the torch runtime "
        "(0 = off; ~0.6 is the reported optimum for 1.58-bit). llama.cpp GGUFs run dense.")
    q_sparse_warmup_steps: Steps = Field(
        0, description="Ramp q_sparsity from 0 over this many optimizer steps of a stage.")


class DataSource(Section):
    """One source of text: a hub data set, local files, or wft's synthetic language."""

    dataset: str | None = Field(None, description="Hugging Face data set name.")
    subset: str | None = Field(None, description="Data set configuration name.")
    split: str = "train"
    files: list[PathText] | None = Field(
        None, min_length=1, description="Local text/JSONL/Parquet files or globs.")
    synthetic: bool = Field(False, description="wft's built-in synthetic language.")
    text_field: str = Field("text", description="Column holding the text (format: text).")
    prompt_field: str = Field("prompt", description="Column holding the prompt (format: task).")
    answer_field: str = Field("answer", description="Column holding the answer (format: task).")
    prompt_template: PromptTemplate | None = Field(
        None,
        description="Build the prompt from columns, e.g. 'Premise: {premise}\nHypothesis: "
        "{hypothesis}\nAnswer:' (format: task; replaces prompt_field).",
    )
    label_names: list[str] | None = Field(
        None,
        min_length=1,
        description="Answer text per integer label, e.g. [entailment, neutral, contradiction]; "
        "the model generates ' <name>' (format: task).",
    )
    streaming: bool = Field(False, description="Stream instead of downloading (large corpora).")
    weight: PositiveWeight = Field(1.0, description="Share of this source in the mix.")

    @model_validator(mode="after")
    def _one_kind(self) -> DataSource:
        kinds = [self.dataset is not None, self.files is not None, self.synthetic]
        if sum(kinds) != 1:
            raise ValueError("set exactly one of `dataset`, `files` or `synthetic: true`")
        return self


_DEFAULT_EVAL_FRACTION = 0.01


class DataSpec(Section):
    format: Literal["text", "task"] = Field(
        "text",
        description="`text`: documents packed into sequences (pre-training); `task`: prompt + "
        "answer pairs, loss on answer tokens only (fine-tuning, distillation).",
    )
    sources: list[DataSource] = Field(
        default_factory=lambda: [DataSource(synthetic=True)], min_length=1)
    seq_len: Int = Field(512, ge=2, le=MAX_SEQ_LEN,
                         description="Tokens per row (at most the model's context).")
    eval: list[DataSource] | None = Field(
        None, min_length=1,
        description="Held-out data named by the user (e.g. `[{files: [val.jsonl]}]`, or a "
        "hub data set with `split: validation`), in `format`: in-training eval, the "
        "`wft pipeline` table and `wft eval RECIPE` score these sources, read once, source by "
        "source in row order, up to `eval_batches` batches; training then uses every row of "
        "`sources`. Unset: the automatic split (`eval_fraction`). Setting both is an error.",
    )
    eval_fraction: Float = Field(
        _DEFAULT_EVAL_FRACTION, ge=0.0, le=0.5,
        description="Without `eval`: share of documents held out for evaluation (0, or 0.001 "
        "to 0.5): every round(1/eval_fraction)-th document of the training sources, by "
        "source row, never trained on. Not allowed beside `eval`.",
    )
    eval_batches: Int = Field(8, ge=1, le=10_000, description="Batches in each evaluation.")
    seed: Seed = 0

    @field_validator("eval_fraction")
    @classmethod
    def _findable(cls, fraction: float) -> float:
        # 1 row in 10^6 held out: evaluation scans millions of documents to find its batches.
        if 0 < fraction < 0.001:
            raise ValueError("must be 0 (no evaluation) or at least 0.001")
        return fraction

    @model_validator(mode="after")
    def _one_held_out_set(self) -> DataSpec:
        if self.eval is not None and self.eval_fraction != _DEFAULT_EVAL_FRACTION:
            raise ValueError(
                "set `eval` (named held-out sources) or `eval_fraction` (an automatic split "
                "of `sources`), not both: with `eval`, training uses every row of `sources`; "
                "remove eval_fraction")
        return self

    @property
    def holds_out(self) -> bool:
        """Whether this section has held-out data: named `eval` sources or a split."""
        return self.eval is not None or self.eval_fraction > 0


class TrainingSpec(Section):
    max_steps: Count = 1000
    micro_batch_size: Int = Field(8, ge=1, le=MAX_BATCH)
    grad_accum: Int = Field(1, ge=1, le=MAX_BATCH)
    global_batch_size: Int | None = Field(
        None, ge=1, le=MAX_BATCH * MAX_BATCH,
        description="Rows per optimizer step over all processes. Set: micro_batch_size and "
        "grad_accum are chosen for the GPU (`gpu_profile`) and the process count.")
    gpu_profile: Literal["auto", "a10g", "l4", "a100-40gb", "a100-80gb", "h100", "h200",
                         "b200"] = Field(
        "auto", description="With global_batch_size: the GPU whose memory sizes the micro-batch "
        "(`auto`: the one this process runs on).")
    lr: Float = Field(3e-4, gt=0.0, le=1.0)
    min_lr_ratio: Fraction = 0.1
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: Steps = 100
    decay_fraction: Float = Field(0.2, gt=0.0, le=1.0, description="WSD: share of steps decaying.")
    optimizer: Literal["adamw", "muon"] = "adamw"
    weight_decay: Fraction = 0.1
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    grad_clip: Float | None = Field(1.0, gt=0.0, le=1e6)
    router_aux_loss_weight: Weight | None = Field(
        None, description="MoE students: weight of the router's load-balancing loss (default: "
        "the model config's router_aux_loss_coef).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="`auto`: bf16 autocast on GPU, fp32 on CPU."
    )
    activation_checkpointing: bool = False
    compile: bool = False
    seed: Seed = 0
    log_every: Count = 10
    eval_every: Count = 200
    save_every: Count = 500
    keep_last: Int = Field(2, ge=1, le=1000)


class TeacherTraining(Section):
    pretrain: TrainingSpec = Field(default_factory=TrainingSpec)
    finetune: TrainingSpec = Field(default_factory=TrainingSpec)


class LoggingSpec(Section):
    wandb: bool = Field(False, description="Also log to Weights & Biases (extra: wandb).")
    tensorboard: bool = Field(
        False, description="Also log to TensorBoard, in <stage>/tensorboard/ (extra: tensorboard).")
    project: str = "wft"
    run_name: str | None = Field(None, description="Default: <name>-<stage>-<timestamp>.")


class PipelineSpec(Section):
    baseline: bool = Field(
        True,
        description="Also train the BitNet-SFT baseline (no SubLN, ternary training only) for "
        "the comparison table: on the distill budget when the recipe has a task, else "
        "continued pre-training on the tokens layerwise + pretrain get.",
    )


class ResumeSpec(Section):
    mode: Literal["auto", "never"] = Field("auto", description="`auto` continues a stopped run.")
    load_optimizer: bool = True
    load_scheduler: bool = True


class MoeFromDense(Section):
    """Turn a dense model into a Mixture of Experts before conversion (fake MoE)."""

    experts: Int = Field(..., ge=2, le=1024, description="Experts per layer, each a copy of "
                         "the dense FFN (training makes them diverge).")
    top_k: Int = Field(2, ge=1, le=1024, description="Experts each token is routed to.")

    @model_validator(mode="after")
    def _fits(self) -> MoeFromDense:
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} is more than experts={self.experts}")
        return self


class ConvertStage(Section):
    """Stage 1: BitLinear in place of every projection, plus SubLN."""

    sub_norm: Literal["paper", "all", "none"] = Field(
        "paper",
        description="`paper`: RMSNorm before o_proj and down_proj (exports to llama.cpp's "
        "bitnet arch); `all`: one before every projection (official code); `none`.",
    )
    sub_norm_eps: Float | None = Field(
        None, gt=0.0, le=1.0,
        description="Default: the model's rms_norm_eps (`paper`), 1e-8 (`all`)."
    )
    output: PathText | None = Field(
        None, description="Default: <output_dir>/<name>/convert/final.")
    moe: MoeFromDense | None = Field(
        None, description="Make the dense model an MoE first (Llama/Mistral -> Mixtral): "
        "experts start as copies of the FFN and the router uniform, so the MoE computes "
        "what the dense model does until training makes the experts diverge.")


class _TrainingStage(Section):
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    data: DataSpec | None = Field(None, description="Default: the top-level `data`.")
    resume: ResumeSpec = Field(default_factory=ResumeSpec)
    init: PathText | None = Field(
        None, description="Starting weights; default: the previous stage.")


class LayerwiseStage(_TrainingStage):
    """Stage 1.9: hidden-state distillation from the frozen teacher, layer by layer."""

    layer_weighting: Literal["linear", "uniform"] = "linear"
    normalize: Literal["l2", "rms"] = "l2"
    ce_weight: Weight = Field(0.0, description="Blend of next-token CE into the loss.")
    distill_share_end: Fraction = Field(
        1.0, description="Distillation share at the last step (decays from 1)."
    )


class PretrainStage(_TrainingStage):
    """Stage 2: continued pre-training with next-token CE."""

    quantize: bool = Field(True, description="False trains a full-precision model (a teacher).")


class CurriculumPhase(Section):
    """One phase of the unified curriculum: until a fraction of the run's steps."""

    until: Float = Field(..., gt=0.0, le=1.0,
                         description="End of the phase, as a fraction of the run's steps.")
    dlm_weight: Weight = Field(..., description="Weight of the masked-diffusion loss.")
    mask_ratio: tuple[Fraction, Fraction] | None = Field(
        None, description="Range [low, high] the noise level t is drawn from in this phase "
        "(default [mask_eps, 1]).")

    @field_validator("mask_ratio")
    @classmethod
    def _ordered(cls, ratio):
        if ratio is not None and not ratio[0] < ratio[1]:
            raise ValueError("needs low < high, e.g. [0.1, 0.9]")
        return ratio


def _default_curriculum() -> list[CurriculumPhase]:
    # METHOD.md section 7: ramp the diffusion weight 0 -> 0.5 -> 1.
    return [CurriculumPhase(until=0.2, dlm_weight=0.0),
            CurriculumPhase(until=0.5, dlm_weight=0.5),
            CurriculumPhase(until=1.0, dlm_weight=1.0)]


class UnifiedStage(_TrainingStage):
    """Next-token CE + masked-diffusion loss in one pass, a curriculum, MuonClip."""

    training: TrainingSpec = Field(default_factory=lambda: TrainingSpec(optimizer="muon"))
    ar_weight: Weight = Field(1.0, description="Weight of the next-token (AR) loss.")
    curriculum: list[CurriculumPhase] = Field(
        default_factory=_default_curriculum, min_length=1, max_length=1000,
        description="Phases by step fraction (`until` rising to 1.0), each with its "
        "diffusion-loss weight and optional mask-ratio range.")
    mask_mode: Literal["split", "complementary"] = Field(
        "split", description="`split`: each micro-batch's rows are shared between the "
        "objectives (no extra compute; with attention=block every row has one noisy copy); "
        "`complementary`: each denoising row is used twice, masked with M and with its "
        "complement (every token denoised once).")
    dlm_share: Float = Field(
        0.5, gt=0.0, lt=1.0, description="Share of each micro-batch's rows that train "
        "denoising while the phase's dlm_weight > 0 (all rows train next-token CE at 0).")
    mask_eps: Float = Field(1e-3, gt=0.0, lt=0.5, description="t ~ U(mask_eps, 1).")
    shift: bool = Field(
        True, description="Keep the next-token shift: logits at position i-1 predict a "
        "masked token at i (AR-to-diffusion adaptation); false: position i predicts itself.")
    attention: Literal["causal", "bidirectional", "anneal", "block"] = Field(
        "block", description="Attention of denoising rows: `block` (block diffusion: rows "
        "laid out [clean | noisy], each noisy block bidirectional and seeing the clean "
        "earlier blocks, as cached decoding does; every row trains both objectives at twice "
        "the tokens); `causal`; `bidirectional`; `anneal` (causal to bidirectional over "
        "anneal_steps). The last three share rows as mask_mode says.")
    anneal_steps: Steps = Field(0, description="`anneal`: steps from causal to bidirectional.")
    block_size: Int = Field(32, ge=1, le=MAX_SEQ_LEN,
                            description="Block length of block diffusion and of decoding.")
    qk_clip_tau: PositiveWeight | None = Field(
        100.0, description="MuonClip: after each step, scale W_q/W_k rows of every head whose "
        "max pre-softmax logit exceeded this (null: off).")

    @model_validator(mode="after")
    def _coherent(self) -> UnifiedStage:
        ends = [phase.until for phase in self.curriculum]
        if any(b <= a for a, b in zip(ends, ends[1:])) or ends[-1] != 1.0:
            raise ValueError(f"curriculum: `until` must rise and end at 1.0 (got {ends})")
        if self.attention == "anneal" and self.anneal_steps == 0:
            raise ValueError("attention=anneal needs anneal_steps > 0 (steps from causal to "
                             "bidirectional)")
        if self.attention == "anneal" and self.anneal_steps > self.training.max_steps:
            raise ValueError(f"anneal_steps={self.anneal_steps} is past training.max_steps="
                             f"{self.training.max_steps}: attention would never become "
                             "bidirectional; lower anneal_steps")
        return self


class DistillStage(_TrainingStage):
    """Stage 3: CE + logits KL + multi-head attention relation distillation."""

    temperature: Float = Field(5.0, gt=0.0, le=1000.0)
    logits_weight: Weight = Field(10.0, description="lambda (10 classification, 1 summ.)")
    attention_weight: Weight = Field(1e5, description="gamma (1e5 classification)")
    attention_layer: Int = Field(
        -1, ge=-1024, le=1023, description="Layer for relation distillation (<0: from end).")
    relation_heads: Int = Field(32, ge=1, le=4096)


class ExportStage(Section):
    type: Literal["tq1_0", "tq2_0", "q2_0", "i2_s", "f16", "bf16"] = "tq2_0"
    output: PathText | None = None
    validate_export: bool = Field(True, alias="validate")


class ServeStage(Section):
    backend: Literal["llamacpp", "torch"] = "llamacpp"
    device: str = Field("auto", description="torch backend: auto (a GPU if any), cpu, cuda, ...")
    host: str = "127.0.0.1"
    port: Int = Field(8000, ge=0, le=65535)
    threads: Int | None = Field(None, ge=1, le=4096)
    max_tokens: Int = Field(512, ge=1, le=MAX_SEQ_LEN)
    max_prompt_tokens: Int = Field(4096, ge=1, le=MAX_SEQ_LEN)
    max_concurrent: Int = Field(4, ge=1, le=10_000)


class LaunchStage(Section):
    """Where `wft launch` runs the recipe: a SkyPilot cloud or Modal."""

    backend: Literal["skypilot", "modal"] = Field(
        "skypilot", description="`skypilot`: any SkyPilot cloud (managed job, preemption "
        "recovery); `modal`: Modal's GPUs (extra: cloud).")
    infra: str | None = Field(
        None, description="SkyPilot infra: a cloud (nebius, runpod, aws, gcp, lambda, azure, "
        "kubernetes, ...), optionally /region[/zone], e.g. aws/us-east-1. Unset: any enabled "
        "cloud SkyPilot finds the GPUs on.")
    accelerators: str = Field(
        "H100:8", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*(:[1-9][0-9]*)?$",
        description="GPU type and count per node, e.g. H100:8, A100-80GB:4, L4.")
    nodes: Int = Field(1, ge=1, le=10_000, description="Machines; each runs one process per GPU.")
    use_spot: bool = Field(False, description="Spot/preemptible machines (the managed job "
                           "resumes from the last checkpoint after a preemption).")
    disk_size: Int = Field(256, ge=32, le=65_536, description="Disk per node in GB.")
    network_tier: Literal["standard", "best"] | None = Field(
        None, description="`best`: the cloud's fastest interconnect (Nebius: InfiniBand, "
        "8-GPU H100/H200/B200/B300 nodes only).")
    bucket: PathText | None = Field(
        None, description="SkyPilot: bucket URL (s3://, gs://, r2://, ...) mounted at "
        "/wft-runs for every stage's checkpoints and final/, on one node (several nodes need "
        "output_dir on a shared file system; RunPod cannot mount buckets: set sync_to "
        "there). Unset: the node's disk (lost with the node).")
    volume: str = Field(
        "wft-runs", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="Modal: the Volume holding checkpoints, outputs and the Hugging Face cache.")
    secrets: list[str] = Field(
        default_factory=lambda: ["HF_TOKEN", "WANDB_API_KEY"], max_length=64,
        description="Names of environment variables passed to the job as secrets (SkyPilot: "
        "from your environment; Modal: Secrets of these names). Values are never written to "
        "a file or a log.")
    max_restarts: Int = Field(
        3, ge=0, le=1000, description="Restarts after a failure that is not a preemption "
        "(preemptions always restart); each resumes from the last checkpoint.")
    job_name: RunName | None = Field(None, description="Default: wft-<name>-<stage>.")


class DistributedSpec(Section):
    """Training on several processes (GPUs, nodes) through torchrun."""

    nproc_per_node: Int = Field(
        1, ge=1, le=1024, description="Processes per machine, one per GPU (`wft <stage> "
        "--nproc-per-node`).")
    nnodes: Int = Field(1, ge=1, le=10_000, description="Machines (`--nnodes`).")
    strategy: Literal["fsdp2", "ddp"] = Field(
        "fsdp2", description="`fsdp2`: parameters, gradients and optimizer state sharded per "
        "decoder layer (fully_shard); `ddp`: a full replica per process.")
    teacher: Literal["replicate", "shard"] = Field(
        "replicate", description="The frozen teacher: a full copy per process (no "
        "communication), or sharded like the student (memory / number of processes).")
    data_shards: Int | None = Field(
        None, ge=1, le=1 << 16, description="Split the training data into this many shards "
        "(default: the number of processes). A run resumes exactly at any process count that "
        "divides it. Fixed by a run's first checkpoint.")
    master_port: Int = Field(29500, ge=1, le=65535, description="Rendezvous port (several nodes).")


class Recipe(Section):
    schema_version: Annotated[Literal[1], NotBool] = Field(
        SCHEMA_VERSION, description="Recipe format version.")
    name: RunName = Field(
        ..., description="Run name: one directory under output_dir (letters, digits, _ . -).")
    description: str | None = None
    output_dir: PathText = Field("runs", description="Where every stage writes.")
    sync_to: PathText | None = Field(
        None,
        description="Also copy every stage's final/ to this fsspec URL (gs://bucket/dir, "
        "s3://..., hf://user/repo); later stages fetch from there when the local copy is "
        "missing.",
    )
    model: ModelSpec
    teacher: TeacherSpec = Field(default_factory=TeacherSpec)
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    pipeline: PipelineSpec = Field(default_factory=PipelineSpec)
    stages: list[PipelineStageName] = Field(
        default_factory=lambda: list(DEFAULT_PIPELINE),
        description="Stages `wft pipeline` runs, in order.",
    )
    convert: ConvertStage = Field(default_factory=ConvertStage)
    layerwise: LayerwiseStage = Field(default_factory=LayerwiseStage)
    pretrain: PretrainStage = Field(default_factory=PretrainStage)
    unified: UnifiedStage = Field(default_factory=UnifiedStage)
    distill: DistillStage = Field(default_factory=DistillStage)
    export: ExportStage = Field(default_factory=ExportStage)
    serve: ServeStage = Field(default_factory=ServeStage)
    launch: LaunchStage = Field(default_factory=LaunchStage)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)

    @model_validator(mode="after")
    def _fits_the_model(self) -> Recipe:
        from wftool.recipe.limits import check_recipe_limits

        check_recipe_limits(self)
        return self

    def stage_dir(self, stage: str) -> str:
        return f"{self.output_dir}/{self.name}/{stage}"


TeacherSpec.model_rebuild()
Recipe.model_rebuild()
