"""Fuzzing the recipe path: over 2,000 seeded bad (and good) recipes and overrides.

Every mistake must end in a WftError (exit 2 with a message naming the field or file), never
a traceback or a hang; values the generator knows are invalid must be refused, and valid
variations accepted with the value asked for. Most cases run in-process through
`load_recipe` (what `wft recipe validate` / `show` do); a sample goes through the CLI runner,
one real `wft` process, `wft convert` and a 1-step `wft pretrain`.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.recipe.fuzz_cases import Case, base_recipe, generate
from wftool.cli import app
from wftool.errors import WftError
from wftool.recipe.load import load_recipe

SEED = 1158
CASE_TIMEOUT_S = 20  # loading one recipe takes milliseconds; anything near this is a hang
STAGE_TIMEOUT_S = 120  # a tiny convert or 1-step pretrain takes a few seconds
runner = CliRunner()


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    def _alarm(signum, frame):
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> tuple[list[Case], Path]:
    tmp = tmp_path_factory.mktemp("fuzz")
    return generate(SEED, str(tmp / "runs"), str(tmp)), tmp


def write_case(case: Case, path: Path) -> str:
    if case.recipe_arg is not None:
        return case.recipe_arg
    data = case.recipe
    if isinstance(data, dict):
        data = yaml.safe_dump(data, sort_keys=False, allow_unicode=False).encode("ascii")
    path.write_bytes(data)
    return str(path)


def _get(recipe, dotted: str):
    value = recipe
    for part in dotted.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def _same(got, want) -> bool:
    if isinstance(want, (list, tuple)):
        return list(got) == list(want)
    if isinstance(want, float) and isinstance(got, float):
        return got == want or (math.isnan(got) and math.isnan(want))
    return got == want


def judge(case: Case, outcome: str, detail) -> str | None:
    """What is wrong with how a case ended (None: nothing)."""
    if outcome in ("traceback", "hang"):
        return f"{outcome}: {detail}"
    if outcome == "ok":
        if case.expect == "invalid":
            return "accepted a value the field excludes"
        for dotted, want in case.checks:
            got = _get(detail, dotted)
            if not _same(got, want):
                return f"{dotted} is {got!r}, expected {want!r}"
        return None
    message = detail
    if case.expect == "valid":
        return f"refused a valid recipe: {message}"
    if case.mentions and not any(m in message for m in case.mentions):
        return f"message does not name {case.mentions}: {message}"
    if "Traceback" in message or len(message) > 3000:
        return f"message is not short: {message[:300]}"
    return None


def load_case(case: Case, path: Path) -> tuple[str, object]:
    """("ok", recipe), ("error", message), ("traceback", ...) or ("hang", ...)."""
    name = write_case(case, path)
    try:
        with time_limit(CASE_TIMEOUT_S):
            return "ok", load_recipe(name, list(case.overrides), stage=case.stage)
    except WftError as err:
        return "error", str(err)
    except Hang as err:
        return "hang", str(err)
    except Exception as err:  # noqa: BLE001 - what this test exists to catch
        return "traceback", f"{type(err).__name__}: {str(err)[:300]}"


def test_fuzz_load_recipe(cases):
    """Every case through load_recipe, in-process."""
    all_cases, tmp = cases
    assert len(all_cases) >= 1000
    problems = []
    for i, case in enumerate(all_cases):
        outcome, detail = load_case(case, tmp / f"case{i}.yaml")
        problem = judge(case, outcome, detail)
        if problem:
            problems.append(f"case {i} [{case}]: {problem}")
    assert not problems, f"{len(problems)} of {len(all_cases)} cases failed:\n" + "\n".join(
        problems[:30])


def _invoke(args: list[str], timeout: float = CASE_TIMEOUT_S):
    with time_limit(timeout):
        return runner.invoke(app, args)


def _cli_problem(case: Case, result) -> str | None:
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"traceback: {type(result.exception).__name__}: {result.exception}"
    if "Traceback" in result.output:
        return f"traceback in the output: {result.output[-500:]}"
    if result.exit_code not in (0, 2):
        return f"exit code {result.exit_code}: {result.output[-300:]}"
    wanted = {"valid": (0,), "invalid": (2,), "any": (0, 2)}[case.expect]
    if result.exit_code not in wanted:
        return f"exit code {result.exit_code}, expected {wanted}: {result.output[-300:]}"
    return None


def test_fuzz_cli_recipe_validate_and_show(cases):
    """A sample of the cases (every 10th) through `wft recipe validate` / `wft recipe show`."""
    all_cases, tmp = cases
    problems = []
    sample = all_cases[::10]
    for i, case in enumerate(sample):
        name = write_case(case, tmp / f"cli{i}.yaml")
        if case.overrides or case.stage or i % 2:
            args = ["recipe", "show", name, *case.overrides]
            args += ["--stage", case.stage] if case.stage else []
        else:
            args = ["recipe", "validate", name]
        try:
            result = _invoke(args)
        except Hang as err:
            problems.append(f"[{case}]: hang: {err}")
            continue
        problem = _cli_problem(case, result)
        if problem:
            problems.append(f"[{case}] {args[:2]}: {problem}")
    assert len(sample) >= 100
    assert not problems, "\n".join(problems[:30])


def test_fuzz_through_the_real_entry_point(cases):
    """One `wft recipe validate` process over every whole-file mistake: a message for each,
    exit 2, no traceback on stderr."""
    all_cases, tmp = cases
    files = [c for c in all_cases if isinstance(c.recipe, bytes) and not c.overrides]
    names = [write_case(c, tmp / f"entry{i}.yaml") for i, c in enumerate(files)]
    result = subprocess.run([sys.executable, "-m", "wftool", "recipe", "validate", *names],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    invalid = sum(c.expect == "invalid" for c in files)
    valid = sum(c.expect == "valid" for c in files)
    assert result.stderr.count("invalid ") >= invalid, result.stderr
    assert result.stdout.count("ok ") >= valid, result.stdout


# ---- a sample at `wft convert` and a 1-step `wft pretrain` -------------------------------

CONVERT_CASES = [
    ([], "valid"),
    (["convert.sub_norm=all"], "valid"),
    (["model.config.hidden_size=128", "model.config.intermediate_size=64"], "valid"),
    (["model.config.vocab_size=300"], "valid"),
    (["model.config.hidden_act=gelu", "model.seed=7"], "valid"),
    (["model.config.num_attention_heads=2"], "valid"),
    (["model.config.model_type=qwen3", "model.config.head_dim=16"], "valid"),
    (["model.config.vocab_size=100"], "invalid"),
    (["model.config.hidden_act=nope"], "invalid"),
    (["model.config.num_attention_heads=3"], "invalid"),
    (["model.config.hidden_size=-8"], "invalid"),
    (["model.config.pad_token_id=512"], "invalid"),
    (["name=.."], "invalid"),
    (["output_dir="], "invalid"),
    (["output_dir={tmp}/a_file/below"], "invalid"),
    (["--output", "{tmp}/a_file"], "invalid"),
    (["convert.output={tmp}/a_file"], "invalid"),
]

PRETRAIN_CASES = [
    ([], "valid"),
    (["training.micro_batch_size=1", "data.seq_len=16", "data.eval_fraction=0"], "valid"),
    (["training.grad_accum=2", "training.schedule=constant", "training.lr=1"], "valid"),
    (["training.max_steps=true"], "invalid"),
    (["data.seq_len=100000000"], "invalid"),
    (["training.micro_batch_size=100000000"], "invalid"),
    (["training.lr=inf"], "invalid"),
    (["data.eval_fraction=1e-9"], "invalid"),
    (["data.seq_len=129"], "invalid"),
]


def test_fuzz_convert_and_pretrain(tmp_path):
    """Valid variations convert (and train one step); mistakes exit 2 before any work."""
    (tmp_path / "a_file").write_text("in the way\n")
    recipe = base_recipe(str(tmp_path / "runs"))
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(recipe))
    problems = []
    for i, (args, expect) in enumerate(CONVERT_CASES):
        args = [a.format(tmp=tmp_path) for a in args]
        if not any(a.startswith(("--output", "output_dir", "convert.output")) for a in args):
            args.append(f"output_dir={tmp_path}/convert{i}")
        case = Case(f"convert {args}", recipe, expect=expect)
        result = _invoke(["convert", str(path), *args], STAGE_TIMEOUT_S)
        problem = _cli_problem(case, result)
        if problem:
            problems.append(f"[{case}]: {problem}")
        elif expect == "valid" and "saved to" not in result.output:
            problems.append(f"[{case}]: no model saved: {result.output[-300:]}")
    student = tmp_path / "convert0" / "fuzz" / "convert" / "final"
    assert (student / "config.json").exists(), problems
    for i, (args, expect) in enumerate(PRETRAIN_CASES):
        args = [*args, f"pretrain.init={student}", f"output_dir={tmp_path}/pretrain{i}"]
        case = Case(f"pretrain {args}", recipe, expect=expect)
        result = _invoke(["pretrain", str(path), *args], STAGE_TIMEOUT_S)
        problem = _cli_problem(case, result)
        if problem:
            problems.append(f"[{case}]: {problem}")
        final = tmp_path / f"pretrain{i}" / "fuzz" / "pretrain" / "final"
        if expect == "valid" and not (final / "config.json").exists():
            problems.append(f"[{case}]: no final model: {result.output[-300:]}")
        if expect == "invalid" and (tmp_path / f"pretrain{i}").exists():
            problems.append(f"[{case}]: wrote {tmp_path}/pretrain{i} before refusing")
    assert not problems, "\n".join(problems)
