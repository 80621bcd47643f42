"""`wft runs` and `wft plot` on a tiny real run (convert, layerwise, pretrain: 6 steps each)
and a copy of it cut short the way a killed pretrain leaves it."""

import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from tests.train.conftest import small_recipe
from wftool.commands.plot import plot_command, plot_run, write_pipeline_plot
from wftool.commands.runs import list_runs, print_runs, runs_command
from wftool.errors import WftError


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    from wftool.commands.convert import run_convert
    from wftool.recipe import load_recipe
    from wftool.train.stages import run_layerwise, run_pretrain

    tmp = tmp_path_factory.mktemp("runs")
    recipe = load_recipe(small_recipe(tmp))
    run_convert(recipe)
    run_layerwise(recipe)
    run_pretrain(recipe)
    runs = Path(recipe.output_dir)
    # A pretrain killed after step 4: the checkpoint at step 4, no step-6, no final/.
    killed = runs / "killed" / "pretrain"
    shutil.copytree(runs / "small", runs / "killed")
    shutil.rmtree(killed / "final")
    shutil.rmtree(killed / "step-6")
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= 4]
    (killed / "metrics.jsonl").write_text("\n".join(kept) + "\n" + '{"step": 5, "lo')  # torn
    (runs / "small" / "small-q2.gguf").write_bytes(b"GGUF" + bytes(60))
    (runs / "not-a-run").mkdir()
    return runs


def _console(width=100):
    return Console(file=io.StringIO(), width=width, color_system=None)


def test_list_runs_reports_finished_and_interrupted(runs_dir):
    runs = {run.name: run for run in list_runs(runs_dir)}
    assert set(runs) == {"small", "killed"}  # not-a-run has no stage folder

    small = runs["small"]
    assert [s.name for s in small.stages] == ["convert", "layerwise", "pretrain"]
    convert, layerwise, pretrain = small.stages
    assert convert.state == "converted" and not convert.trains
    assert (layerwise.done, layerwise.planned, layerwise.state) == (6, 6, "finished")
    assert (pretrain.done, pretrain.planned, pretrain.state) == (6, 6, "finished")
    assert "eval_loss" in pretrain.eval
    assert small.state == "finished"
    assert small.ggufs == [("small-q2.gguf", 64)]
    assert small.size_bytes > 0 and small.modified is not None

    killed = runs["killed"].stages[-1]
    assert (killed.name, killed.done, killed.planned, killed.state) == \
        ("pretrain", 4, 6, "interrupted")

    console = _console(140)
    print_runs(list(runs.values()), console)
    table = console.file.getvalue()
    assert "interrupted" in table and "4/6" in table and "6/6" in table


def test_runs_command_on_missing_or_empty_folder(tmp_path, capsys):
    runs_command(tmp_path / "nothing")
    assert "does not exist" in " ".join(capsys.readouterr().out.split())
    runs_command(tmp_path)
    assert "No runs in" in " ".join(capsys.readouterr().out.split())
    (tmp_path / "file").write_text("")
    with pytest.raises(WftError, match="is a file"):
        runs_command(tmp_path / "file")


def test_plot_terminal_names_every_stage(runs_dir):
    console = _console()
    result = plot_run(runs_dir / "small", None, console)
    text = console.file.getvalue()
    assert result.curves == 2 and result.png is None
    assert "layerwise" in text and "pretrain" in text
    assert "steps 7-12" in text  # pretrain follows layerwise on the step axis
    assert any("\u2800" < ch <= "\u28ff" for ch in text)  # braille dots drawn
    assert all(len(line) <= 100 for line in text.splitlines())


def test_plot_writes_png(runs_dir, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "out" / "curves.png"
    result = plot_run(runs_dir / "small", png, _console())
    assert result.png == png and result.curves == 2  # one line per stage with metrics
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000

    assert write_pipeline_plot(runs_dir / "killed") == runs_dir / "killed" / "curves.png"
    assert (runs_dir / "killed" / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_png_without_matplotlib_says_how_to_install(runs_dir, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    console = _console()
    with pytest.raises(WftError) as err:
        plot_run(runs_dir / "small", tmp_path / "c.png", console)
    assert "wftool[plot]" in err.value.hint
    assert "pretrain" in console.file.getvalue()  # the terminal plot came first
    assert write_pipeline_plot(runs_dir / "small") is None


def test_plot_errors_name_the_folder(tmp_path):
    with pytest.raises(WftError, match="does not exist"):
        plot_run(tmp_path / "missing", None, _console())
    (tmp_path / "empty" / "convert").mkdir(parents=True)
    with pytest.raises(WftError, match="no training metrics"):
        plot_run(tmp_path / "empty", None, _console())
    with pytest.raises(WftError, match="not a recipe"):
        plot_command(str(tmp_path / "missing"))


def test_plot_command_resolves_a_recipe(runs_dir, capsys):
    plot_command(str(runs_dir.parent / "small.yaml"))
    assert "pretrain" in capsys.readouterr().out


def test_commands_register_on_a_typer_app(runs_dir, tmp_path):
    """What cli.py will do: the functions are typer commands as they stand."""
    import typer
    from typer.testing import CliRunner

    from wftool.cli import user_errors

    app = typer.Typer()
    app.command("runs")(user_errors(runs_command))
    app.command("plot")(user_errors(plot_command))
    runner = CliRunner()
    result = runner.invoke(app, ["runs", "--output-dir", str(runs_dir)])
    assert result.exit_code == 0 and "killed" in result.output
    result = runner.invoke(app, ["plot", str(runs_dir / "small")])
    assert result.exit_code == 0 and "layerwise" in result.output
    result = runner.invoke(app, ["plot", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "wft --help" not in result.output
