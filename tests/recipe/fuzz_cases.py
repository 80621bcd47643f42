"""Seeded generator of recipe mistakes (and of valid variations) for tests/recipe/test_fuzz.py.

Each case says what it did (`label`), what the loader must do (`expect`: valid, invalid or
any) and, for mistakes, what the message must name; valid cases say which values the loaded
recipe must hold. Everything comes from one `random.Random(seed)`, so a failure replays.
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

SMALL_CONFIG = {
    "model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 128, "tie_word_embeddings": True,
}
INF, NAN = float("inf"), float("nan")


def base_recipe(output_dir: str) -> dict:
    """A valid recipe: a 2-layer model on synthetic data (fast to convert and train)."""
    training = {"max_steps": 1, "micro_batch_size": 2, "lr": 1e-3, "warmup_steps": 0,
                "log_every": 1, "eval_every": 1000, "save_every": 1000}
    return {
        "name": "fuzz", "output_dir": output_dir,
        "model": {"config": dict(SMALL_CONFIG), "tokenizer": "synthetic", "dtype": "float32"},
        "data": {"seq_len": 32, "eval_fraction": 0.1, "eval_batches": 1},
        "pretrain": {"training": dict(training)},
        "layerwise": {"training": dict(training)},
        "distill": {"training": dict(training), "data": {"format": "task", "seq_len": 32,
                                                          "eval_fraction": 0.1,
                                                          "eval_batches": 1}},
    }


@dataclass
class Case:
    label: str
    recipe: Any  # dict (written as YAML), str (YAML text) or bytes (the file as is)
    overrides: list[str] = field(default_factory=list)
    stage: str | None = None
    expect: str = "invalid"  # "valid", "invalid" or "any" (only: no traceback, no hang)
    mentions: tuple[str, ...] = ()  # the error message must name one of these
    checks: list[tuple[str, Any]] = field(default_factory=list)  # (dotted attr, value)
    recipe_arg: str | None = None  # load this name instead of the written file

    def __str__(self) -> str:
        return (f"{self.label} | expect {self.expect} | overrides {self.overrides} | "
                f"stage {self.stage}")


@dataclass
class Num:
    """A numeric field: its bounds, whether a bound is open, whether null is allowed."""

    path: str
    kind: type
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    good: tuple = ()  # valid values when the bounds alone do not say (cross-field checks)
    bad: tuple = ()  # extra invalid values
    also: tuple = ()  # other fields a message may name instead (a cross-field check)


_TRAININGS = ("pretrain.training", "layerwise.training", "distill.training",
              "teacher.train.pretrain")
_DATAS = ("data", "distill.data")


def numeric_fields() -> list[Num]:
    fields = []
    for t in _TRAININGS:
        fields += [
            Num(f"{t}.max_steps", int, 1, 10**9), Num(f"{t}.micro_batch_size", int, 1, 65536),
            Num(f"{t}.grad_accum", int, 1, 65536), Num(f"{t}.lr", float, 0, 1, low_open=True),
            Num(f"{t}.min_lr_ratio", float, 0, 1), Num(f"{t}.warmup_steps", int, 0, 10**9),
            Num(f"{t}.decay_fraction", float, 0, 1, low_open=True),
            Num(f"{t}.weight_decay", float, 0, 1),
            Num(f"{t}.grad_clip", float, 0, 1e6, low_open=True, optional=True),
            Num(f"{t}.router_aux_loss_weight", float, 0, 1e9, optional=True),
            Num(f"{t}.log_every", int, 1, 10**9), Num(f"{t}.eval_every", int, 1, 10**9),
            Num(f"{t}.save_every", int, 1, 10**9), Num(f"{t}.keep_last", int, 1, 1000),
            Num(f"{t}.seed", int, 0, 2**63 - 1),
        ]
    for d in _DATAS:
        fields += [
            # seq_len: the model's context is 128 (max_position_embeddings).
            Num(f"{d}.seq_len", int, 2, 128, bad=(10**8, 1 << 20)),
            Num(f"{d}.eval_batches", int, 1, 10_000),
            Num(f"{d}.eval_fraction", float, 0, 0.5, good=(0.0, 0.001, 0.25, 0.5),
                bad=(1e-9, 0.0005, 0.51, 0.99)),
            Num(f"{d}.seed", int, 0, 2**63 - 1),
        ]
    fields += [
        Num("quantization.warmup_steps", int, 0, 10**9),
        Num("convert.sub_norm_eps", float, 0, 1, low_open=True, optional=True),
        Num("layerwise.ce_weight", float, 0, 1e9), Num("layerwise.distill_share_end", float, 0, 1),
        Num("unified.mask_eps", float, 0, 0.5, low_open=True, high_open=True),
        Num("unified.ar_weight", float, 0, 1e9),
        Num("unified.dlm_share", float, 0, 1, low_open=True, high_open=True),
        Num("unified.block_size", int, 1, 1 << 20),
        Num("quantization.q_sparsity", float, 0, 1, high_open=True),
        Num("quantization.q_sparse_warmup_steps", int, 0, 10**9),
        Num("unified.qk_clip_tau", float, 0, 1e6, low_open=True, optional=True),
        Num("distill.temperature", float, 0, 1000, low_open=True),
        Num("distill.logits_weight", float, 0, 1e9), Num("distill.attention_weight", float, 0, 1e9),
        Num("distill.attention_layer", int, -2, 1, bad=(1023, -1024)),  # a 2-layer model
        # Q is 64 wide and K/V 32: relation heads must divide both.
        Num("distill.relation_heads", int, 1, 32, good=(1, 2, 4, 8, 16, 32), bad=(3, 5, 64)),
        Num("serve.port", int, 0, 65535), Num("serve.threads", int, 1, 4096, optional=True),
        Num("serve.max_tokens", int, 1, 1 << 20), Num("serve.max_concurrent", int, 1, 10_000),
        Num("launch.nodes", int, 1, 10_000),
        Num("launch.disk_size", int, 32, 65_536), Num("launch.max_restarts", int, 0, 1000),
        Num("distributed.nproc_per_node", int, 1, 1024), Num("distributed.nnodes", int, 1, 10_000),
        Num("distributed.data_shards", int, 1, 1 << 16, optional=True),
        Num("distributed.master_port", int, 1, 65535),
        Num("model.seed", int, 0, 2**63 - 1),
        # model.config: sizes wft and transformers accept, kept small enough to build.
        Num("model.config.vocab_size", int, 260, 1 << 20, bad=(100, 259)),
        Num("model.config.hidden_size", int, 64, 4096, good=(64, 128, 256, 4096),
            bad=(-8, 3, 1 << 17, 66)),
        Num("model.config.intermediate_size", int, 1, 1 << 18),
        Num("model.config.num_hidden_layers", int, 1, 1024),
        Num("model.config.num_attention_heads", int, 2, 4, good=(2, 4), bad=(3, 5, 1025),
            also=("num_key_value_heads",)),
        Num("model.config.num_key_value_heads", int, 2, 4, optional=True, good=(2, 4, None),
            bad=(3, 8), also=("relation_heads",)),
        Num("model.config.max_position_embeddings", int, 32, 1 << 20, bad=(16, 1 << 21),
            also=("seq_len",)),
        Num("model.config.rms_norm_eps", float, 0, 1, low_open=True),
        Num("model.config.rope_theta", float, 0, 1e12, low_open=True),
        Num("model.config.pad_token_id", int, 0, 511, optional=True, bad=(512,)),
    ]
    return fields


def _good_values(num: Num, rng: random.Random) -> list:
    if num.good:
        return list(num.good)
    values = []
    if num.kind is int:
        low, high = int(num.low), int(num.high)
        values += [low, high, rng.randint(low, min(high, low + 1000))]
        if not num.path.startswith("model.config."):  # transformers' config wants ints
            values.append(float(low))  # 8.0 is the integer 8
    else:
        if not num.low_open:
            values.append(num.low)
        if not num.high_open:
            values.append(num.high)
        values.append(rng.uniform(num.low, num.high) or num.high / 2)
        values.append(num.low + (num.high - num.low) * 1e-3)
    if num.optional:
        values.append(None)
    return values


def _bad_values(num: Num) -> list:
    values: list = [True, False, "lots", [1], {"a": 1}, INF, -INF, NAN, 10**30, -(10**30)]
    if not num.optional:
        values.append(None)
    if num.kind is int:
        values += [int(num.low) - 1, int(num.high) + 1, num.low + 0.5]
    else:
        values += [num.low if num.low_open else num.low - abs(num.low) - 1e-3,
                   num.high if num.high_open else num.high * 2 + 1, 1e30]
    return values + list(num.bad)


def yaml_value(value: Any) -> str:
    """The override text for `value` (JSON is YAML, except for infinities and nan)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    return json.dumps(value)


def set_path(tree: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _field_case(base: dict, num: Num, value: Any, valid: bool, rng: random.Random) -> Case:
    """Put `value` into `num.path`: in the file, or as an override (stage-relative when
    the path is inside a stage section)."""
    recipe = copy.deepcopy(base)
    label = f"{num.path}={value!r}"
    key = (num.path.rsplit(".", 1)[-1], *num.also)
    checks = [(num.path, value)] if valid else []
    how = rng.random()
    if how < 0.4:
        set_path(recipe, num.path, value)
        return Case(f"file {label}", recipe, expect="valid" if valid else "invalid",
                    mentions=key, checks=checks)
    stage, rest = num.path.split(".", 1)
    if how < 0.7 and stage in ("pretrain", "layerwise", "distill", "unified", "convert") \
            and rest.split(".")[0] in ("training", "data", key[0]):
        override, use_stage = f"{rest}={yaml_value(value)}", stage
    else:
        override, use_stage = f"{num.path}={yaml_value(value)}", None
    return Case(f"override {label}", recipe, [override], use_stage,
                expect="valid" if valid else "invalid", mentions=key, checks=checks)


ENUMS = {
    "model.dtype": (["auto", "float32", "bfloat16", "float16"], ["float64", "", 16, True]),
    "convert.sub_norm": (["paper", "all", "none"], ["middle", None, 1]),
    "pretrain.training.schedule": (["cosine", "wsd", "constant"], ["linear", []]),
    "pretrain.training.optimizer": (["adamw", "muon"], ["sgd", {"x": 1}]),
    "pretrain.training.precision": (["auto", "fp32", "bf16"], ["fp8"]),
    "data.format": (["text", "task"], ["json", 0]),
    "export.type": (["tq1_0", "tq2_0", "i2_s", "f16", "bf16"], ["q4_0", "TQ2_0"]),
    "serve.backend": (["llamacpp", "torch"], ["vllm"]),
    "launch.backend": (["skypilot", "modal"], ["slurm", "local"]),
    "launch.network_tier": (["standard", "best", None], ["fast"]),
    "distributed.strategy": (["fsdp2", "ddp"], ["fsdp", "deepspeed"]),
    "distributed.teacher": (["replicate", "shard"], ["offload"]),
    "pretrain.resume.mode": (["auto", "never"], ["always", False]),
    "model.config.hidden_act": (["silu", "gelu", "relu"], ["nope", "", 3, None, True, ["silu"]]),
    "model.config.model_type": (["llama", "qwen3", "mistral", "qwen2"],
                                ["gpt2", "", 3, None, ["llama"]]),
    "model.config.rope_scaling": ([{"rope_type": "linear", "factor": 2.0}, None],
                                  [{"type": "bogus"}, {"rope_type": "linear"}, "x", [1]]),
    "schema_version": ([1], [2, 0, "1.0", True]),
    "stages": ([["convert"], ["convert", "pretrain", "export"], []],
               [["nope"], "convert", [1], [["convert"]]]),
    "pretrain.training.betas": ([[0.9, 0.95], [0.0, 0.999]],
                                [[1.0, 0.9], [0.9], [INF, 0.9], "x", [0.9, -0.1], [True, 0.9]]),
    "unified.curriculum": ([[{"until": 1.0, "dlm_weight": 1.0}],
                            [{"until": 0.5, "dlm_weight": 0.0},
                             {"until": 1.0, "dlm_weight": 2.0, "mask_ratio": [0.1, 0.9]}]],
                           [[], [{"until": 0.5, "dlm_weight": 1.0}], "x",
                            [{"until": 1.0, "dlm_weight": -1.0}],
                            [{"until": 1.0, "dlm_weight": 1.0, "mask_ratio": [0.9, 0.1]}],
                            [{"until": 0.6, "dlm_weight": 1.0}, {"until": 0.6, "dlm_weight": 1.0},
                             {"until": 1.0, "dlm_weight": 1.0}]]),
    "unified.attention": (["causal", "bidirectional", "block"], ["anneal", "full", 1]),
    "convert.moe": ([{"experts": 4, "top_k": 2}, {"experts": 2, "top_k": 2}, None],
                    [{"experts": 1}, {"experts": 4, "top_k": 5}, {"top_k": 2}, "x",
                     {"experts": 4, "top_k": 0}, {"experts": True}]),
}

NAMES = (["tiny", "a", "run_1", "x.y", "A-b_c.2", "n" * 100, "1"],
         ["", ".", "..", ".hidden", "-x", "a/b", "a b", "n" * 101, "caf\u00e9", 123, True,
          None, [], "a\\b", "..\\x", "a\0b"])


def path_cases(base: dict, tmp: str) -> list[Case]:
    cases = []
    good_names, bad_names = NAMES
    for name in good_names:
        recipe = copy.deepcopy(base)
        recipe["name"] = name
        cases.append(Case(f"name={name!r}", recipe, expect="valid", checks=[("name", name)]))
    for name in bad_names:
        recipe = copy.deepcopy(base)
        recipe["name"] = name
        cases.append(Case(f"name={name!r}", recipe, mentions=("name",)))
    for value in ["", "   ", None, 5, "a\0b", "x" * 300 + "/runs", "/" + "y/" * 3000]:
        recipe = copy.deepcopy(base)
        recipe["output_dir"] = value
        cases.append(Case(f"output_dir={value!r:.40}", recipe, mentions=("output_dir",)))
    for key in ("convert.output", "export.output", "pretrain.init", "model.tokenizer",
                "teacher.name_or_path", "sync_to"):
        for value in ["", "z" * 256, "a\0b"]:
            recipe = copy.deepcopy(base)
            set_path(recipe, key, value)
            cases.append(Case(f"{key}={value!r:.40}", recipe, mentions=(key.split(".")[-1],)))
    recipe = copy.deepcopy(base)
    recipe["output_dir"] = f"{tmp}/elsewhere"
    cases.append(Case("output_dir elsewhere", recipe, expect="valid",
                      checks=[("output_dir", f"{tmp}/elsewhere")]))
    return cases


# ---- whole-file mistakes -----------------------------------------------------------------

GOOD_YAML = "name: t\nmodel: {name_or_path: some/model}\n"


def text_cases() -> list[Case]:
    digits = "9" * 5000
    cases = [
        Case("non-UTF-8 byte", b"name: t\nmodel: {name_or_path: \xff\xfe}\n", mentions=("UTF-8",)),
        Case("latin-1 text", "name: caf\u00e9\nmodel: {name_or_path: x}\n".encode("latin-1"),
             mentions=("UTF-8",)),
        Case("UTF-16 file", GOOD_YAML.encode("utf-16"), mentions=("binary",)),
        Case("binary garbage", bytes(range(256)) * 4, mentions=("binary",)),
        Case("UTF-8 BOM is fine", b"\xef\xbb\xbf" + GOOD_YAML.encode(), expect="valid"),
        Case("empty file", b"", mentions=("mapping",)),
        Case("a list", "- a\n- b\n", mentions=("mapping",)),
        Case("a scalar", "just text\n", mentions=("mapping",)),
        Case("5,000-digit integer", GOOD_YAML + f"data: {{seed: {digits}}}\n",
             mentions=("integer",)),
        Case("5,000-digit negative", GOOD_YAML + f"data: {{seq_len: -{digits}}}\n",
             mentions=("integer",)),
        Case("huge hex integer", GOOD_YAML + "data: {seed: 0x" + "f" * 5000 + "}\n",
             mentions=("data.seed",)),
        Case("huge octal integer", GOOD_YAML + "model: {name_or_path: x, seed: 0" + "7" * 40
             + "}\n", mentions=("seed",)),
        Case("1e400 is inf", GOOD_YAML + "pretrain: {training: {lr: 1.0e400}}\n",
             mentions=("lr",)),
        Case("recursive list alias", GOOD_YAML + "description: &a [*a]\n",
             mentions=("recursive",)),
        Case("recursive mapping alias in model.config",
             "name: t\nmodel:\n  config: &c {model_type: llama, self: *c}\n"
             "  tokenizer: synthetic\n",
             mentions=("recursive",)),
        Case("recursive alias in a source",
             GOOD_YAML + "data:\n  sources: &s\n    - {synthetic: true, label_names: *s}\n",
             mentions=("recursive",)),
        Case("billion laughs", GOOD_YAML + _laughs(), mentions=("aliases",)),
        Case("deep nesting", GOOD_YAML + "description: " + "[" * 3000 + "]" * 3000 + "\n"),
        Case("deep mapping nesting", GOOD_YAML + "model_extra: " + "{a: " * 100 + "1"
             + "}" * 100 + "\n", mentions=("nested",)),
        Case("date where text is meant", GOOD_YAML + "description: 2024-01-01\n",
             mentions=("date",)),
        Case("bad date", GOOD_YAML + "description: 2024-13-45\n"),
        Case("!!binary", GOOD_YAML + "description: !!binary aGVsbG8=\n", mentions=("binary",)),
        Case("!!set", GOOD_YAML + "stages: !!set {convert: null}\n", mentions=("set",)),
        Case("!!python/object", GOOD_YAML + "description: !!python/object:os.system ls\n",
             mentions=("YAML",)),
        Case("!!omap", GOOD_YAML + "data: !!omap [{seq_len: 8}]\n", mentions=("tuple",)),
        Case("boolean key", GOOD_YAML + "yes: 1\n", mentions=("True",)),
        Case("integer key", GOOD_YAML + "1: x\n", mentions=("1",)),
        Case("null key", GOOD_YAML + "data: {null: 3}\n", mentions=("None",)),
        Case("unclosed bracket", "name: t\nmodel:\n  name_or_path: [unclosed\n",
             mentions=("invalid YAML",)),
        Case("tab indentation", "name: t\nmodel:\n\tname_or_path: x\n", mentions=("YAML",)),
        Case("control character", "name: t\x07\nmodel: {name_or_path: x}\n"),
        Case("lone surrogate", GOOD_YAML + 'description: "\\ud800"\n', mentions=("surrogate",)),
        Case("NUL in a string", GOOD_YAML + 'description: "a\\0b"\n', mentions=("NUL",)),
        Case("over 1 MiB", GOOD_YAML + "# " + "x" * (1 << 20) + "\n", mentions=("bytes",)),
        Case("benign aliases are fine",
             GOOD_YAML + "pretrain: {training: &t {max_steps: 9}}\nlayerwise: {training: *t}\n",
             ["pretrain.training.max_steps=3"], expect="valid",
             checks=[("pretrain.training.max_steps", 3), ("layerwise.training.max_steps", 9)]),
        Case("merge keys are fine",
             GOOD_YAML + "pretrain: {training: &t {max_steps: 9}}\n"
             "layerwise: {training: {<<: *t, lr: 0.5}}\n", expect="valid",
             checks=[("layerwise.training.max_steps", 9), ("layerwise.training.lr", 0.5)]),
        Case("schema_version 1 as text", GOOD_YAML + "schema_version: '1'\n"),
        Case("prompt_template positional", GOOD_YAML + "data: {format: task, sources: "
             "[{synthetic: true, prompt_template: 'Q: {0}'}]}\n", mentions=("prompt_template",)),
        Case("prompt_template unclosed", GOOD_YAML + "data: {sources: [{synthetic: true, "
             "prompt_template: 'Q: {x'}]}\n", mentions=("prompt_template",)),
        Case("prompt_template attribute", GOOD_YAML + "data: {sources: [{synthetic: true, "
             "prompt_template: '{a.b}'}]}\n", mentions=("prompt_template",)),
        Case("prompt_template named", GOOD_YAML + "data: {sources: [{synthetic: true, "
             "prompt_template: 'P: {premise} {{lit}}'}]}\n", expect="valid"),
        Case("no sources", GOOD_YAML + "data: {sources: []}\n", mentions=("sources",)),
        Case("two kinds in a source", GOOD_YAML + "data: {sources: [{synthetic: true, "
             "dataset: x}]}\n", mentions=("sources[0]",)),
        Case("empty files", GOOD_YAML + "data: {sources: [{files: []}]}\n", mentions=("files",)),
        Case("zero weight", GOOD_YAML + "data: {sources: [{synthetic: true, weight: 0}]}\n",
             mentions=("weight",)),
        Case("empty label_names", GOOD_YAML + "data: {sources: [{synthetic: true, "
             "label_names: []}]}\n", mentions=("label_names",)),
    ]
    for case in cases:
        if isinstance(case.recipe, str):
            case.recipe = case.recipe.encode("utf-8", "surrogatepass")
    return cases


def _laughs() -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        refs = ", ".join([f"*l{i - 1}"] * 9)
        lines.append(f"l{i}: &l{i} [{refs}]")
    return "description_laughs:\n" + "".join(f"  {line}\n" for line in lines)


def override_cases(base: dict) -> list[Case]:
    bad = [
        ("noequals", ("key=value",)), ("=3", ("key=value",)), ("a..b=1", ("empty part",)),
        ("name.x=1", ("name",)), ("data.seq_len.x=1", ("seq_len",)),
        ("training.max_steps=[1", ("max_steps",)), ("training.max_steps=" + "9" * 5000, ()),
        ("training.max_steps=0x" + "f" * 5000, ("max_steps",)),
        ("training.max_steps=&a [*a]", ("recursive",)),
        ("model.config.hidden_act=nope", ("hidden_act",)),
        ("model.config.num_attention_heads=3", ("num_attention_heads",)),
        ("model.config.hidden_size=-8", ("hidden_size",)),
        ("model.config.vocab_size=100", ("vocab_size",)), ("name=..", ("name",)),
        ("output_dir=", ("output_dir",)), ("output_dir=''", ("output_dir",)),
        ("training.max_steps=true", ("max_steps",)), ("training.lr=inf", ("lr",)),
        ("training.lr=.inf", ("lr",)), ("training.lr=1e30", ("lr",)),
        ("training.lr=1.0e30", ("lr",)), ("data.seq_len=100000000", ("seq_len",)),
        ("training.micro_batch_size=1e8", ("micro_batch_size",)),
        ("training.micro_batch_size=100000000", ("micro_batch_size",)),
        ("training.micro_batch_size=65536", ("micro_batch_size",)),  # x seq_len 32: 2M tokens
        ("data.eval_batches=10000", ("eval_batches",)),  # x 2 x 32: fine ... see below
        ("a" * 300 + "=1", ()), ("model=3", ("model",)), ("model.config=[1]", ("config",)),
        ("data.sources=[]", ("sources",)), ("data.sources={}", ("sources",)),
        ("pretrain=null", ("pretrain",)),
        ("model.config." + "k" * 40 + "=\"\\0\"", ("NUL",)),
        ("name=\"\\ud800\"", ("surrogate",)), ("training.max_steps=!!binary aGk=", ("binary",)),
        ("data.seed=" + "[" * 2000, ()),
    ]
    cases = []
    for item, mentions in bad:
        expect = "invalid"
        if item.startswith("data.eval_batches=10000") or item.startswith(
                "training.micro_batch_size=65536"):
            expect = "valid"
            mentions = ()
        cases.append(Case(f"override {item:.60}", copy.deepcopy(base), [item], "pretrain",
                          expect=expect, mentions=mentions))
    good = [("name=2024-01-01", [("name", "2024-01-01")]),
            ("training.max_steps=1000.0", [("pretrain.training.max_steps", 1000)]),
            ("model.config.hidden_act=gelu", [("model.config", None)]),
            ("description=2024-13-45", [("description", "2024-13-45")]),
            ("description=some text with = sign", [("description", "some text with = sign")]),
            ("training.lr=1", [("pretrain.training.lr", 1.0)])]
    for item, checks in good:
        checks = [c for c in checks if c[1] is not None]
        cases.append(Case(f"override {item}", copy.deepcopy(base), [item], "pretrain",
                          expect="valid", checks=checks))
    return cases


# ---- random structural mutations ---------------------------------------------------------

def _leaves(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        out = []
        for key, value in tree.items():
            path = f"{prefix}.{key}" if prefix else key
            out += _leaves(value, path) if isinstance(value, dict) and value else [path]
        return out
    return [prefix]


def _sections(tree: dict, prefix: str = "") -> list[str]:
    out = [prefix] if prefix else []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _sections(value, f"{prefix}.{key}" if prefix else key)
    return out


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 3:
        return word + "x"
    i = rng.randrange(len(word) - 1)
    edits = [word[:i] + word[i + 1] + word[i] + word[i + 2:], word[:i] + word[i + 1:],
             word + "s", word.upper()]
    typo = rng.choice(edits)
    return typo if typo != word else word + "_"


JUNK = [True, False, None, 0, -1, 2**40, 1.5, INF, NAN, "", "text", [], [1, "a"], {},
        {"k": 1}, "0x10", "1e3", -0.0]


def random_cases(base: dict, rng: random.Random, n: int) -> list[Case]:
    cases = []
    for _ in range(n):
        recipe = copy.deepcopy(base)
        choice = rng.random()
        if choice < 0.35:  # an unknown key (often a typo of a real one)
            section = rng.choice(_sections(recipe))
            node = recipe
            for part in section.split("."):
                node = node[part]
            if section.startswith("model.config"):
                continue  # any config key is transformers' to accept
            known = list(node) or ["key"]
            key = (_typo(rng.choice(known), rng) if rng.random() < 0.7
                   else f"zz_{rng.randrange(999)}")
            if key in node:
                continue
            node[key] = rng.choice(JUNK)
            cases.append(Case(f"unknown key {section}.{key}", recipe, mentions=(key,)))
        elif choice < 0.5:  # a whole section replaced by a scalar or list
            section = rng.choice([s for s in _sections(recipe) if s != "model.config"])
            value = rng.choice([3, "text", [1, 2], True, 1.5])
            set_path(recipe, section, value)
            cases.append(Case(f"section {section}={value!r}", recipe,
                              mentions=(section.split(".")[-1],)))
        elif choice < 0.8:  # a leaf replaced by junk: whatever it means, never a traceback
            leaf = rng.choice(_leaves(recipe))
            set_path(recipe, leaf, rng.choice(JUNK))
            cases.append(Case(f"junk {leaf}={_leaf(recipe, leaf)!r}", recipe, expect="any"))
        else:  # the same as an override
            leaf = rng.choice(_leaves(recipe))
            value = rng.choice(JUNK)
            cases.append(Case(f"junk override {leaf}", recipe, [f"{leaf}={yaml_value(value)}"],
                              expect="any"))
    return cases


def _leaf(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def generate(seed: int, output_dir: str, tmp: str, n_random: int = 300) -> list[Case]:
    """Every case, in a fixed order for a given seed."""
    rng = random.Random(seed)
    base = base_recipe(output_dir)
    cases = [Case("the base recipe", copy.deepcopy(base), expect="valid")]
    for num in numeric_fields():
        for value in _good_values(num, rng):
            cases.append(_field_case(base, num, value, True, rng))
        for value in _bad_values(num):
            cases.append(_field_case(base, num, value, False, rng))
    for path, (good, bad) in ENUMS.items():
        key = path.rsplit(".", 1)[-1]
        for value in good:
            recipe = copy.deepcopy(base)
            set_path(recipe, path, value)
            if path == "model.config.model_type" and value in ("qwen3",):
                recipe["model"]["config"]["head_dim"] = 16
            cases.append(Case(f"{path}={value!r}", recipe, expect="valid"))
        for value in bad:
            recipe = copy.deepcopy(base)
            set_path(recipe, path, value)
            cases.append(Case(f"{path}={value!r}", recipe, mentions=(key,)))
    cases += path_cases(base, tmp)
    cases += text_cases()
    cases += override_cases(base)
    cases += random_cases(base, rng, n_random)
    return cases
