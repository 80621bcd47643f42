"""Recipes: every shipped file validates; mistakes give dotted, did-you-mean messages."""

import pytest
import yaml

from wftool.errors import WftError
from wftool.recipe import STAGES, Recipe, bundled_recipes, load_recipe
from wftool.recipe.load import apply_overrides, override_path

EXPECTED_RECIPES = {"tiny", "smollm2_135m", "smollm2_135m_cpu", "smollm2_135m_gpu", "smollm2_1_7b",
                    "qwen3_0_6b", "qwen3_4b", "byo"}


def test_all_expected_recipes_are_bundled():
    assert EXPECTED_RECIPES <= set(bundled_recipes())


@pytest.mark.parametrize("name", sorted(bundled_recipes()))
def test_every_shipped_recipe_validates_and_documents_itself(name):
    path = bundled_recipes()[name]
    recipe = load_recipe(str(path))
    assert recipe.name == name
    text = path.read_text()
    assert text.startswith(f"# {name}:"), "a recipe opens with what it does"
    assert "wft " in text.split("schema_version")[0], "and how to launch it"
    for stage in STAGES:
        assert getattr(recipe, stage) is not None


def test_tiny_recipe_is_exportable_shape():
    recipe = load_recipe("tiny")
    config = recipe.model.config
    assert config["model_type"] == "llama" and config["tie_word_embeddings"]
    assert config["hidden_size"] % 256 == 0 and config["intermediate_size"] % 256 == 0


def _write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _minimal(**extra):
    data = {"name": "t", "model": {"name_or_path": "some/model"}}
    data.update(extra)
    return data


def _error(tmp_path, data, overrides=(), stage=None) -> str:
    with pytest.raises(WftError) as err:
        load_recipe(_write(tmp_path, data), list(overrides), stage=stage)
    return str(err.value)


def test_unknown_key_gets_dotted_path_and_suggestion(tmp_path):
    message = _error(tmp_path, _minimal(pretrain={"training": {"max_step": 5}}))
    assert "pretrain.training.max_step: unknown key; did you mean 'max_steps'?" in message


def test_unknown_top_level_section_lists_alternatives_when_no_close_match(tmp_path):
    message = _error(tmp_path, _minimal(zzzz=1))
    assert "zzzz: unknown key (valid keys:" in message and "pretrain" in message


def test_wrong_type_names_field_and_value(tmp_path):
    message = _error(tmp_path, _minimal(data={"seq_len": "long"}))
    assert "data.seq_len:" in message and "'long'" in message


def test_list_items_are_located(tmp_path):
    message = _error(tmp_path, _minimal(data={"sources": [{"dataset": "a", "wieght": 2}]}))
    assert "data.sources[0].wieght: unknown key; did you mean 'weight'?" in message


def test_model_needs_exactly_one_source(tmp_path):
    message = _error(tmp_path, {"name": "t", "model": {}})
    assert "model: set exactly one of `name_or_path` or `config`" in message


def test_missing_required_field(tmp_path):
    message = _error(tmp_path, {"model": {"name_or_path": "x"}})
    assert "name: required field is missing" in message


def test_schema_version_is_checked(tmp_path):
    message = _error(tmp_path, _minimal(schema_version=2))
    assert "schema_version" in message


def test_invalid_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: t\nmodel:\n  name_or_path: [unclosed\n")
    with pytest.raises(WftError, match=r"bad.yaml:\d+:\d+: invalid YAML"):
        load_recipe(str(path))


def test_non_mapping_recipe(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(WftError, match="must be a mapping"):
        load_recipe(str(path))


def test_missing_file_suggests_bundled_name():
    with pytest.raises(WftError) as err:
        load_recipe("tinny")
    assert "not found" in str(err.value) and "tiny" in str(err.value)
    with pytest.raises(WftError, match="not found"):
        load_recipe("does/not/exist.yaml")


def test_bundled_name_resolves_with_or_without_suffix():
    assert load_recipe("tiny").name == load_recipe("tiny.yaml").name == "tiny"


def test_overrides_resolve_inside_the_stage_first():
    raw = {"name": "t", "pretrain": {"data": {"seq_len": 64}}}
    assert override_path("training.max_steps", raw, "pretrain") == [
        "pretrain", "training", "max_steps",
    ]
    # `data` exists in the pretrain section of this file, so it lands there ...
    assert override_path("data.seq_len", raw, "pretrain") == ["pretrain", "data", "seq_len"]
    # ... but at the top level when the stage does not set its own data.
    assert override_path("data.seq_len", {"name": "t"}, "pretrain") == ["data", "seq_len"]
    assert override_path("model.dtype", raw, "pretrain") == ["model", "dtype"]
    assert override_path("pretrain.quantize", raw, "distill") == ["pretrain", "quantize"]
    assert override_path("training.lr", raw, None) == ["training", "lr"]


def test_overrides_are_type_checked_by_the_same_models():
    recipe = load_recipe("tiny", ["training.max_steps=7", "data.seq_len=64"], stage="pretrain")
    assert recipe.pretrain.training.max_steps == 7
    assert recipe.data.seq_len == 64
    with pytest.raises(WftError) as err:
        load_recipe("tiny", ["training.max_steps=lots"], stage="pretrain")
    assert "pretrain.training.max_steps" in str(err.value)
    assert "[from override training.max_steps=lots]" in str(err.value)


def test_override_values_parse_as_yaml():
    raw = {}
    apply_overrides(raw, ["a.b=3", "a.c=true", "a.d=[1, 2]", "a.e=null", "a.f=text"])
    assert raw == {"a": {"b": 3, "c": True, "d": [1, 2], "e": None, "f": "text"}}


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1"])
def test_malformed_overrides(bad):
    with pytest.raises(WftError):
        apply_overrides({}, [bad])


def test_override_into_a_value_is_refused():
    with pytest.raises(WftError, match="is a value, not a section"):
        apply_overrides({"name": "t"}, ["name.x=1"])


def test_schema_exports_and_forbids_extras():
    schema = Recipe.model_json_schema(by_alias=True)
    assert schema["additionalProperties"] is False
    assert {"model", "pretrain", "distill", "export", "launch"} <= set(schema["properties"])


# ---- the tester's findings: each mistake is a message naming the field or file -----------

def _small(tmp_path, **extra):
    from tests.recipe.fuzz_cases import base_recipe

    data = base_recipe(str(tmp_path / "runs"))
    data.update(extra)
    return data


def test_unreadable_files_are_named(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes(b"name: t\nmodel: {name_or_path: \xff\xfe}\n")
    with pytest.raises(WftError, match=r"latin.yaml:2:23: not UTF-8 text \(byte 0xff\)"):
        load_recipe(str(path))
    path.write_bytes("name: t\n".encode("utf-16"))
    with pytest.raises(WftError, match="latin.yaml is a binary file"):
        load_recipe(str(path))


@pytest.mark.parametrize("text, message", [
    ("data: {seed: " + "9" * 5000 + "}", "r.yaml:3:14: a value YAML cannot convert (an integer "
     "of 5,000 digits)"),
    ("data: {seed: 0x" + "f" * 5000 + "}", "data.seed: an integer of 20000 bits"),
    ("description: &a [*a]", "description[0] contains itself (a recursive YAML alias)"),
    ("description: 2024-01-01", "description: YAML read 2024-01-01 as a date"),
])
def test_values_yaml_cannot_hold_give_a_message(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text("name: t\nmodel: {name_or_path: x}\n" + text + "\n")
    with pytest.raises(WftError) as err:
        load_recipe(str(path))
    assert message in str(err.value)


def test_aliases_are_copied_so_an_override_changes_one_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: t\nmodel: {name_or_path: x}\n"
                    "pretrain: {training: &t {max_steps: 9}}\nlayerwise: {training: *t}\n")
    recipe = load_recipe(str(path), ["training.max_steps=3"], stage="pretrain")
    assert recipe.pretrain.training.max_steps == 3
    assert recipe.layerwise.training.max_steps == 9


@pytest.mark.parametrize("override, message", [
    ("model.config.hidden_act=nope", "model.config.hidden_act: not an activation"),
    ("model.config.num_attention_heads=3",
     "model.config.num_attention_heads: must divide hidden_size (64)"),
    ("model.config.hidden_size=-8", "model.config.hidden_size: must be between 1 and 65536"),
    ("model.config.num_key_value_heads=3",
     "model.config.num_key_value_heads: must divide num_attention_heads (4)"),
    ("model.config.vocab_size=100", "model.config.vocab_size: the synthetic tokenizer has at "
     "least 260 tokens"),
    ("model.config.pad_token_id=512", "model.config.pad_token_id: must be a token id below "
     "vocab_size (512)"),
    ("model.config.tie_word_embeddings=1", "model.config.tie_word_embeddings: transformers "
     "rejects it"),
    ("model.config.model_type=gpt2", "model.config.model_type: model family 'gpt2' is not "
     "supported"),
    ("data.seq_len=256", "data.seq_len: longer than the model's context "
     "(model.config.max_position_embeddings = 128)"),
    ("distill.attention_layer=2", "distill.attention_layer: the model has 2 layers"),
    ("distill.relation_heads=64", "distill.relation_heads: must divide the width"),
    ("name=..", "name: must be one directory name"),
    ("name=" + "n" * 101, "name: must be one directory name of at most 100 characters"),
    ("output_dir=''", "output_dir: must not be empty"),
    ("training.max_steps=true", "pretrain.training.max_steps: expected a number, not a "
     "boolean"),
    ("training.lr=.inf", "pretrain.training.lr: Input should be a finite number"),
    ("training.lr=1.0e30", "pretrain.training.lr: Input should be less than or equal to 1"),
    ("data.seq_len=100000000", "data.seq_len: Input should be less than or equal to 1048576"),
    ("training.micro_batch_size=100000000", "pretrain.training.micro_batch_size: Input "
     "should be less than or equal to 65536"),
    ("training.micro_batch_size=65536", None),  # x seq_len 32: 2M tokens, allowed
    ("data.eval_fraction=1e-9", "data.eval_fraction: must be 0 (no evaluation) or at least"),
    ("data.eval_fraction=0.9", "data.eval_fraction: Input should be less than or equal to 0.5"),
])
def test_bad_values_are_refused_when_read(tmp_path, override, message):
    path = _write(tmp_path, _small(tmp_path))
    if message is None:
        load_recipe(path, [override], stage="pretrain")
        return
    with pytest.raises(WftError) as err:
        load_recipe(path, [override], stage="pretrain")
    assert message in str(err.value)
    assert f"[from override {override[:40]}" in str(err.value)


def test_batch_tokens_are_bounded_across_sections(tmp_path):
    data = _small(tmp_path, data={"seq_len": 128})
    data["model"]["config"]["max_position_embeddings"] = 1 << 20
    path = _write(tmp_path, data)
    message = _error_of(path, ["pretrain.training.micro_batch_size=65536"])
    assert ("pretrain.training.micro_batch_size: 65536 rows x data.seq_len 128 = 8,388,608 "
            "tokens per micro-batch, over 4,194,304") in message


def _error_of(path, overrides):
    with pytest.raises(WftError) as err:
        load_recipe(path, overrides)
    return str(err.value)


def test_int_valued_floats_in_model_config_are_floats(tmp_path):
    recipe = load_recipe(_write(tmp_path, _small(tmp_path)), ["model.config.rms_norm_eps=1",
                                                               "model.config.rope_theta=10000"])
    assert recipe.model.config["rms_norm_eps"] == 1.0
    assert isinstance(recipe.model.config["rms_norm_eps"], float)


def test_prompt_templates_are_checked(tmp_path):
    source = {"synthetic": True, "prompt_template": "Q: {0}"}
    message = _error(tmp_path, _minimal(data={"format": "task", "sources": [source]}))
    assert "data.sources[0].prompt_template: '{0}' is not a column name" in message


def test_the_byo_recipe_is_a_template_for_real_models():
    """Your own model, text files and task file, at the paper's distillation settings rather
    than the tiny recipe's lr 1e-3 (which wrecks a pre-trained model)."""
    recipe = load_recipe("byo")
    assert recipe.model.name_or_path == "./my-model" and recipe.model.config is None
    assert recipe.data.sources[0].files and recipe.data.format == "text"
    assert recipe.distill.data.format == "task" and recipe.distill.data.sources[0].files
    assert recipe.distill.data.seq_len == 512
    training = recipe.distill.training
    assert training.lr == 5e-5 and training.schedule == "cosine"
    assert training.micro_batch_size * training.grad_accum == 32
    for stage in ("layerwise", "pretrain", "distill"):
        assert getattr(recipe, stage).training.lr <= 1e-4
    assert "REPLACE" in bundled_recipes()["byo"].read_text()


def test_named_eval_sources_load_and_refuse_an_eval_fraction_beside_them(tmp_path):
    val = {"files": [str(tmp_path / "val.jsonl")]}
    recipe = load_recipe(_write(tmp_path, _minimal(
        data={"eval": [val]},
        distill={"data": {"format": "task", "eval": [{"dataset": "glue", "subset": "mnli",
                                                      "split": "validation_matched"}]}})))
    assert recipe.data.eval[0].files == val["files"] and recipe.data.holds_out
    assert recipe.distill.data.eval[0].split == "validation_matched"
    message = _error(tmp_path, _minimal(distill={"data": {"eval": [val],
                                                          "eval_fraction": 0.05}}))
    assert "distill.data:" in message and "not both" in message and "eval_fraction" in message
    # The held-out batches of named sources count against the same memory limit.
    message = _error(tmp_path, _minimal(data={"eval": [val], "eval_batches": 10_000,
                                              "seq_len": 4096},
                                        distill={"training": {"micro_batch_size": 8}}))
    assert "data.eval_batches" in message
    recipe = load_recipe(_write(tmp_path, _minimal(data={"eval": [val], "eval_fraction": 0.01})))
    assert recipe.data.eval is not None  # the default value, written out, is no conflict
