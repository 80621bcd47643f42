"""Drive `wft convert` then `wft export-gguf` as a user would."""

from pathlib import Path

from typer.testing import CliRunner

from wftool.cli import app

runner = CliRunner()


def convert_tiny(tmp_path: Path, *overrides: str) -> Path:
    """The tiny recipe's student, converted with `overrides`, in tmp_path/student."""
    student = tmp_path / "student"
    result = runner.invoke(app, ["convert", "tiny", "--output", str(student), *overrides])
    assert result.exit_code == 0, result.output
    return student


def export(student: Path, output: Path, *options: str):
    """`wft export-gguf` on `student`; returns (exit code, output with rich's wrapping undone)."""
    result = runner.invoke(app, ["export-gguf", str(student), "--output", str(output), *options])
    return result.exit_code, " ".join(result.output.split())
