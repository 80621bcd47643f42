"""The `wft` command line, driven as a user would through Typer's runner."""

import pytest
from typer.testing import CliRunner

from wftool.cli import app
from wftool.model.checkpoint import load_ternary_model
from wftool.model.surgery import bitlinear_layers

runner = CliRunner()


def test_help_lists_every_stage():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for verb in ("convert", "layerwise", "pretrain", "unified", "distill", "export-gguf",
                 "serve", "launch", "pipeline", "eval", "doctor", "recipe"):
        assert verb in result.output


def test_bad_override_exits_2_without_traceback():
    result = runner.invoke(app, ["convert", "tiny", "convert.sub_norm=middle"])
    assert result.exit_code == 2
    assert "convert.sub_norm" in result.output and "'middle'" in result.output
    assert "Traceback" not in result.output


def test_convert_tiny_end_to_end(tmp_path):
    out = tmp_path / "student"
    result = runner.invoke(app, ["convert", "tiny", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "28 projections" in result.output and "llama.cpp bitnet: ok" in result.output
    model, tokenizer, meta = load_ternary_model(out)
    assert meta.family == "llama" and meta.sub_norm == "paper"
    assert len(bitlinear_layers(model)) == 28
    assert len(tokenizer) == model.config.vocab_size
    # A second run refuses to clobber the output unless asked to.
    again = runner.invoke(app, ["convert", "tiny", "--output", str(out)])
    assert again.exit_code == 2 and "--force" in again.output
    forced = runner.invoke(app, ["convert", "tiny", "--output", str(out), "--force",
                                 "convert.sub_norm=all"])
    assert forced.exit_code == 0, forced.output
    assert "llama.cpp bitnet: no" in forced.output
    plain = runner.invoke(app, ["convert", "tiny", "--output", str(out), "--force",
                                "convert.sub_norm=none"])
    assert plain.exit_code == 0, plain.output
    assert "llama.cpp llama: ok" in plain.output  # no sub-norms: the plain llama graph


def test_convert_reports_the_export_plan_for_the_recipes_export_type(tmp_path):
    # SmolLM2-135M's width: no TQ type holds rows of 576, F16 (its recipe's type) does.
    wide = ["model.config.hidden_size=576", "model.config.intermediate_size=1536"]
    out = tmp_path / "student"
    tq = runner.invoke(app, ["convert", "tiny", "--output", str(out), *wide])
    assert tq.exit_code == 0, tq.output
    assert "llama.cpp bitnet: no" in tq.output and "(576, 576)" in tq.output
    assert "not a multiple of 256 (TQ2_0)" in tq.output
    shown = " ".join(tq.output.replace("│", " ").split())
    assert "TQ2_0 (export.type) cannot hold rows of 576" in shown  # no size for it
    assert "MB as TQ2_0" not in shown
    f16 = runner.invoke(app, ["convert", "tiny", "--output", str(out), "--force", *wide,
                              "export.type=f16"])
    assert f16.exit_code == 0, f16.output
    assert "llama.cpp bitnet: ok as F16" in f16.output
    q2 = runner.invoke(app, ["convert", "tiny", "--output", str(out), "--force", *wide,
                             "export.type=q2_0"])
    assert q2.exit_code == 0, q2.output
    assert "llama.cpp bitnet: ok as Q2_0" in q2.output
    assert "MB as Q2_0 (export.type)" in " ".join(q2.output.replace("│", " ").split())


def test_convert_unsupported_family_exits_2(tmp_path):
    recipe = tmp_path / "gpt2.yaml"
    recipe.write_text("name: g\nmodel:\n  config: {model_type: gpt2}\n  tokenizer: synthetic\n")
    result = runner.invoke(app, ["convert", str(recipe), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "not supported" in result.output and "qwen3" in result.output


def test_convert_missing_local_model_exits_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: m\nmodel:\n  name_or_path: {tmp_path}/nowhere\n")
    result = runner.invoke(app, ["convert", str(recipe), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "cannot load model" in result.output


def test_recipe_show_applies_overrides():
    result = runner.invoke(app, ["recipe", "show", "tiny", "training.max_steps=9",
                                 "--stage", "pretrain"])
    assert result.exit_code == 0, result.output
    assert "max_steps: 9" in result.output


def test_recipe_validate_reports_each_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\nmodel: {name_or_path: x}\nconvert: {sub_norms: paper}\n")
    result = runner.invoke(app, ["recipe", "validate", "tiny", str(bad)])
    assert result.exit_code == 2
    assert "ok" in result.output and "did you mean 'sub_norm'" in result.output


def test_recipe_schema_and_list():
    import json

    schema = runner.invoke(app, ["recipe", "schema"])
    assert schema.exit_code == 0 and json.loads(schema.output)["title"] == "Recipe"
    listing = runner.invoke(app, ["recipe", "list"])
    assert listing.exit_code == 0 and "qwen3_4b" in listing.output


def test_doctor_reports_versions():
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "torch" in result.output and "llama-cpp-python" in result.output


def test_doctor_says_which_collective_backend_processes_use():
    import torch

    from wftool.commands.doctor import distributed_row

    name, backends, purpose = distributed_row(torch.device("cpu"))
    assert name == "distributed" and "gloo" in backends.split(", ")
    assert "--nproc-per-node uses gloo" in purpose


def test_convert_refuses_a_file_where_it_writes_a_directory(tmp_path):
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("x")
    onto = runner.invoke(app, ["convert", "tiny", "--output", str(in_the_way)])
    assert onto.exit_code == 2 and "Traceback" not in onto.output
    assert "--output" in onto.output and "is a file" in onto.output
    below = runner.invoke(app, ["convert", "tiny", f"output_dir={in_the_way}/runs"])
    assert below.exit_code == 2 and "Traceback" not in below.output
    assert "output_dir" in below.output and "a file" in below.output


@pytest.mark.parametrize("override, field", [
    ("model.config.hidden_act=nope", "model.config.hidden_act"),
    ("model.config.num_attention_heads=3", "model.config.num_attention_heads"),
    ("model.config.hidden_size=-8", "model.config.hidden_size"),
    ("model.config.vocab_size=100", "model.config.vocab_size"),
])
def test_convert_refuses_bad_model_config_before_any_work(tmp_path, override, field):
    result = runner.invoke(app, ["convert", "tiny", override, f"output_dir={tmp_path}"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert field in result.output
    assert not (tmp_path / "tiny").exists()


def test_unwritable_paths_are_a_message_not_a_traceback(tmp_path, monkeypatch):
    """An OSError about a path (a full disk, no permission) while a command writes."""
    import errno

    import wftool.commands.convert as convert_command

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr(convert_command, "save_model_dir", refuse)
    result = runner.invoke(app, ["convert", "tiny", "--output", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "No space left on device" in " ".join(result.output.split())


COMMANDS = [["convert"], ["layerwise"], ["pretrain"], ["unified"], ["distill"], ["launch"],
            ["eval"], ["export-gguf"], ["serve"], ["pipeline"], ["doctor"], ["runs"], ["plot"],
            ["recipe", "show"], ["recipe", "validate"], ["recipe", "schema"], ["recipe", "list"]]


def test_the_help_checks_cover_every_command():
    import typer.main

    root = typer.main.get_command(app)
    names = set()
    for name, command in root.commands.items():
        subcommands = getattr(command, "commands", None)
        names |= {f"{name} {sub}" for sub in subcommands} if subcommands else {name}
    assert names == {" ".join(c) for c in COMMANDS}


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_help_ends_with_examples_on_their_own_lines(command):
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    examples = result.output.split("Examples:", 1)[1]
    lines = [line.strip() for line in examples.splitlines() if line.strip()]
    # Every example is a whole line that starts with `wft` (or is a `#` comment above one).
    assert lines and all(line.startswith(("wft ", "#")) for line in lines)
    assert any(line.startswith(f"wft {' '.join(command)}") for line in lines)
    assert "<bool>" not in result.output  # flags take no value


def test_stage_examples_come_from_the_stage_registry():
    result = runner.invoke(app, ["pretrain", "--help"], env={"COLUMNS": "80"})
    assert "wft pretrain tiny" in result.output
    assert "wft pretrain recipes/byo.yaml training.max_steps=100" in result.output


def test_version_prints_the_package_version():
    from wftool import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"wft {__version__}\n"


def test_training_commands_build_the_torchrun_command():
    result = runner.invoke(app, ["pretrain", "tiny", "--nproc-per-node", "8", "--nnodes", "2",
                                 "--node-rank", "1", "--master-addr", "10.0.0.1", "--dry-run",
                                 "training.max_steps=3"])
    assert result.exit_code == 0, result.output
    argv = result.output.split()
    assert argv[1:4] == ["-m", "torch.distributed.run", "--nnodes"]
    assert " ".join(argv[3:]) == ("--nnodes 2 --node-rank 1 --master-addr 10.0.0.1 "
                                  "--master-port 29500 --nproc-per-node 8 -m wftool pretrain "
                                  "tiny training.max_steps=3")
    local = runner.invoke(app, ["distill", "tiny", "distributed.nproc_per_node=2", "--dry-run"])
    assert "--standalone --nproc-per-node 2 -m wftool distill tiny" in local.output


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2"], "needs --master-addr"),
    (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], "outside 0 to 1"),
])
def test_bad_process_layouts_are_refused(args, message):
    result = runner.invoke(app, ["pretrain", "tiny", *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split())


def test_pipeline_refuses_several_processes():
    result = runner.invoke(app, ["pipeline", "tiny", "distributed.nproc_per_node=2"])
    assert result.exit_code == 2
    assert "runs in one process" in " ".join(result.output.split())


def test_recipe_show_prints_yaml_that_reads_back_whatever_the_width():
    import yaml

    long_path = "/data/" + "x" * 120
    result = runner.invoke(app, ["recipe", "show", "tiny", f"output_dir={long_path}"],
                           env={"COLUMNS": "80"})
    assert result.exit_code == 0
    assert yaml.safe_load(result.output)["output_dir"] == long_path


def test_dry_run_of_one_process_says_it_trains_without_torchrun():
    result = runner.invoke(app, ["pretrain", "tiny", "--dry-run"])
    assert result.exit_code == 0 and "without torchrun" in result.output
