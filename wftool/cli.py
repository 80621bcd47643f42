"""The `wft` command: one verb per stage, each taking a recipe plus dotted overrides.

Heavy libraries (torch, transformers) are imported inside the commands so `wft --help`
stays instant.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from wftool.errors import WftError


class _FlagGroup(TyperGroup):
    """Help as it should read: flags (`--help`, `--force`, ...) without a value (Typer labels
    every boolean option `<bool>`, as if it took one), and each command's line in the list
    joined from its docstring's first paragraph (Rich markup mode keeps its line breaks)."""

    def get_params(self, ctx):
        return [_bare_flag(param) for param in super().get_params(ctx)]

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            for param in command.params:
                _bare_flag(param)
            _bare_flag(command.get_help_option(ctx))
            if command.short_help is None and command.help:
                command.short_help = " ".join(command.help.split("\n\n")[0].split())
        return command


def _bare_flag(option):
    if option is not None and getattr(option, "is_flag", False) and option.metavar is None:
        option.metavar = ""
    return option


def _examples(*lines: str) -> str:
    """The `Examples:` block closing a command's --help (its epilog): one command a line, an
    optional `  # why` after it printed as a comment line above it (lines stay short at 80
    columns, and the block pastes into a shell as it is)."""
    body = []
    for line in lines:
        command, _, why = line.partition("  #")
        if why:
            body.append(f"[dim]# {escape(why.strip())}[/]")
        body.append(escape(command.rstrip()))
    # No indentation: Typer strips the common indent of the lines after the first.
    return "[bold]Examples:[/]\n" + "\n".join(body)


app = typer.Typer(
    name="wft",
    help="Turn full-precision LLMs into 1.58-bit (ternary) models with BitDistill, and ship them.",
    epilog=_examples("wft pipeline tiny  # the whole method on a laptop CPU, no download",
                     "wft recipe list  # the bundled recipes",
                     "wft pretrain --help  # any command's options, with examples"),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    cls=_FlagGroup,
)
recipe_app = typer.Typer(help="Inspect, check and list recipes.", no_args_is_help=True,
                         cls=_FlagGroup)
app.add_typer(recipe_app, name="recipe")

console = Console()
error_console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"wft {_version()}", highlight=False, markup=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print wft's version and exit.")] = False,
):
    # The options of `wft` itself; its help text is the Typer's above.
    pass


RecipeArg = Annotated[
    str, typer.Argument(help="Recipe YAML file, or a bundled recipe name (`wft recipe list`).")
]
OverridesArg = Annotated[
    Optional[list[str]],
    typer.Argument(
        help="Dotted overrides, e.g. `training.max_steps=100 data.seq_len=256` (keys resolve "
        "inside this stage's section first, then at the top level)."
    ),
]


def user_errors(command):
    """Print WftError as one clear message and exit 2; tracebacks are for bugs only."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except WftError as err:
            _note_user_error()
            # Under torchrun every rank may fail; the others say which they are.
            rank = distributed_rank()
            where = f"(rank {rank}) " if rank else ""
            error_console.print(f"[bold red]error:[/] {where}{escape(err.message)}",
                                highlight=False)
            if err.hint:
                error_console.print(f"[yellow]hint:[/] {escape(err.hint)}", highlight=False)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            error_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except OSError as err:
            # A path the user chose that cannot be written (a file in the way, no
            # permission, a full disk) is theirs to fix; any other OSError is a bug.
            if err.errno not in _PATH_ERRNOS or err.filename is None:
                raise
            error_console.print(f"[bold red]error:[/] {escape(str(err.filename))}: "
                                f"{escape(err.strerror or str(err))}", highlight=False)
            hint = ("free disk space, or choose another output_dir (or --output)"
                    if err.errno in (errno.ENOSPC, errno.EDQUOT) else
                    "check the paths in the recipe (output_dir, name, convert.output, ...) "
                    "and the options")
            error_console.print(f"[yellow]hint:[/] {hint}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


_PATH_ERRNOS = {errno.EACCES, errno.EPERM, errno.EEXIST, errno.ENOTDIR, errno.EISDIR,
                errno.ENAMETOOLONG, errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ELOOP}


def check_output_dir(path: Path, what: str) -> None:
    """Refuse, before any work, a directory to write that a file is in the way of or that
    cannot be created here; `what` names where the path came from (--output, output_dir)."""
    try:
        for candidate in (path, *path.parents):
            if not candidate.exists():
                continue
            if not candidate.is_dir():
                where = "is a file" if candidate == path else f"is under {candidate}, a file"
                raise WftError(f"{what} {path} {where}; wft writes a directory there",
                               "choose another path, or move the file away")
            if not os.access(candidate, os.W_OK | os.X_OK):
                raise WftError(f"{what} {path}: cannot create it in {candidate} (no permission)",
                               "choose a directory you can write")
            return
    except OSError as err:  # e.g. a name longer than the file system allows
        raise WftError(f"{what} {path}: {err.strerror or err}") from None


def _load(recipe: str, overrides: list[str] | None, stage: str | None):
    from wftool.recipe.load import load_recipe

    return load_recipe(recipe, overrides or [], stage=stage)


@app.command(epilog=_examples(
    "wft convert tiny  # runs/tiny/convert/final",
    "wft convert tiny convert.sub_norm=none  # no SubLN: llama.cpp's plain `llama` graph",
    "wft convert smollm2_135m --output student --force  # replace ./student",
))
@user_errors
def convert(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    output: Annotated[
        Optional[Path], typer.Option(help="Output directory (default: runs/<name>/convert/final).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
):
    """Insert SubLN and BitLinear into a Hugging Face causal LM and save the student."""
    config = _load(recipe, overrides, "convert")
    from wftool.commands.convert import default_convert_output, print_convert_summary, run_convert

    if output is not None:
        check_output_dir(output, "--output")
    else:
        check_output_dir(default_convert_output(config),
                         "convert.output" if config.convert.output else "output_dir")
    with console.status(f"converting {config.model.name_or_path or config.name} ..."):
        result = run_convert(config, output=output, force=force)
    print_convert_summary(result, config, console)


def _stage_examples(stage) -> str:
    """Examples for a stage's command, from the stage registry."""
    return _examples(
        f"wft {stage.name} tiny  # the bundled tiny recipe, on a CPU",
        f"wft {stage.name} recipes/byo.yaml training.max_steps=100  # sets "
        f"{stage.name}.training.max_steps",
        f"wft {stage.name} qwen3_4b --nproc-per-node 8  # 8 GPUs, FSDP2",
        f"wft {stage.name} smollm2_135m training.lr=1e-4 data.seq_len=1024",
        f"wft recipe show tiny --stage {stage.name} training.max_steps=100  # what that "
        "resolves to",
    )


def _training_command(stage: str):
    @user_errors
    def command(
        recipe: RecipeArg,
        overrides: OverridesArg = None,
        nproc_per_node: Annotated[Optional[int], typer.Option(
            min=1, help="Processes on this machine, one per GPU, through torchrun (default: "
            "the recipe's distributed section).")] = None,
        nnodes: Annotated[Optional[int], typer.Option(
            min=1, help="Machines in the run (default: the recipe's).")] = None,
        node_rank: Annotated[Optional[int], typer.Option(
            min=0, help="This machine's rank, 0 to nnodes-1.")] = None,
        master_addr: Annotated[Optional[str], typer.Option(
            help="Address of node rank 0 (several machines).")] = None,
        master_port: Annotated[Optional[int], typer.Option(
            min=1, max=65535, help="Rendezvous port (default: 29500, or the recipe's).")
        ] = None,
        dry_run: Annotated[bool, typer.Option(
            "--dry-run", help="Print the torchrun command this runs, and exit.")] = False,
    ):
        config = _load(recipe, overrides, stage)
        from wftool.train import distributed
        from wftool.train.torchrun import (
            describe,
            needs_torchrun,
            resolve_processes,
            run_torchrun,
            torchrun_argv,
        )

        # Under torchrun the processes are decided; the recipe's defaults are not re-read.
        processes = None if distributed.launched_by_torchrun() else resolve_processes(
            config, nproc_per_node, nnodes, node_rank, master_addr, master_port)
        if dry_run:
            if processes is None or processes.total == 1:
                console.print(f"one process: `wft {stage}` trains here, without torchrun")
                return
            argv = torchrun_argv(processes, [stage, recipe, *(overrides or [])])
            console.print(describe(argv), highlight=False, markup=False, soft_wrap=True)
            return
        if processes is not None and needs_torchrun(processes):
            argv = torchrun_argv(processes, [stage, recipe, *(overrides or [])])
            check_output_dir(Path(config.stage_dir(stage)), "output_dir")
            code = run_torchrun(argv)
            if code:
                raise typer.Exit(code)
            return
        check_output_dir(Path(config.stage_dir(stage)), "output_dir")
        from wftool.stage_registry import get_stage

        distributed.init_from_environment()  # before the stage fetches or loads anything
        try:
            result = get_stage(stage).run_function()(config, console)
        finally:
            distributed.shutdown()
        if distributed_rank() == 0:
            summary = ", ".join(f"{k} {v:.4g}" for k, v in result.eval.items())
            console.print(f"[green]{stage} done[/] after {result.steps} steps: {summary}")
            console.print(f"saved to {result.final_dir}")

    return command


def _note_user_error() -> None:
    """Under `wft <stage> --nproc-per-node N`, tell the parent that a rank failed on a user
    error (torchrun itself exits 1 whatever its children's codes), so it exits 2 too."""
    marker = os.environ.get("WFT_USER_ERROR_FILE")
    if marker:
        try:
            Path(marker).touch()
        except OSError:
            pass


def distributed_rank() -> int:
    """This process's rank under torchrun (0 otherwise), without importing torch."""
    return int(os.environ.get("RANK", "0"))


def _register_stage_commands() -> None:
    from wftool.stage_registry import STUDENT_STAGES

    for stage in STUDENT_STAGES:
        if not stage.trains:
            continue  # convert has its own options
        command = _training_command(stage.name)
        command.__doc__ = stage.summary
        app.command(name=stage.name, epilog=_stage_examples(stage))(command)


_register_stage_commands()


def _register_launch() -> None:
    from wftool.commands.launch import register

    register(app)


_register_launch()


@app.command("eval", epilog=_examples(
    "wft eval tiny  # teacher, every stage and the GGUF exports",
    "wft eval runs/tiny/distill/final runs/tiny/tiny-tq2_0.gguf  # a student and its GGUF",
    "wft eval tiny --output eval.json  # also the numbers as JSON",
    "wft eval tiny --text held_out.txt --task my_task.jsonl",
    "wft eval runs/tiny/distill/final --lm-eval arc_easy,hellaswag --limit 200",
))
@user_errors
def evaluate(
    sources: Annotated[list[str], typer.Argument(
        help="Recipes (everything they produced: teacher, each stage's final/, GGUF exports), "
        "model directories and .gguf files; `key=value` items override the recipe.")],
    text: Annotated[Optional[Path], typer.Option(
        help="Held-out text (.txt paragraphs, or .jsonl/.parquet `text`) instead of the "
        "recipe's eval split.")] = None,
    task: Annotated[Optional[Path], typer.Option(
        help="Task examples (.jsonl/.parquet with `prompt` and `answer`) instead of the "
        "recipe's task data.")] = None,
    batches: Annotated[Optional[int], typer.Option(
        min=1, help="At most this many batches per set (default: the recipe's "
        "data.eval_batches; all of a file).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows per batch.")] = 8,
    seq_len: Annotated[Optional[int], typer.Option(
        min=2, help="Tokens per row (default: the recipe's data.seq_len, else 512).")] = None,
    lm_eval: Annotated[Optional[str], typer.Option(
        "--lm-eval", help="Comma-separated lm-eval-harness tasks: names, or local task .yaml "
        "files (needs `pip install lm-eval`).")] = None,
    limit: Annotated[Optional[int], typer.Option(
        min=1, help="lm-eval: at most this many examples per task.")] = None,
    threads: Annotated[int, typer.Option(min=1, help="llama.cpp threads for GGUF files.")] = 1,
    device: Annotated[str, typer.Option(help="PyTorch device: auto, cpu, cuda, ...")] = "auto",
    decode_tokens: Annotated[int, typer.Option(
        min=0, help="Students of `wft unified`: tokens each decoding mode (ar, diffusion, "
        "speculative) makes per prompt for its tokens/s (0: skip the decoding table).")] = 32,
    output: Annotated[Optional[Path], typer.Option(help="Also write the numbers as JSON.")] = None,
):
    """Loss, perplexity and task accuracy of teachers, ternary students (their quantized
    forward) and GGUF exports (through llama.cpp), on the same held-out tokens; for students
    of `wft unified` also their diffusion loss and each decoding mode's speed and accuracy."""
    from wftool.commands.evaluate import (
        EvalOptions,
        check_output,
        print_eval_table,
        run_eval,
        save_report,
    )

    if output:
        check_output(output)  # before the work, not after it
    tasks = [t.strip() for t in (lm_eval or "").split(",") if t.strip()]
    options = EvalOptions(text=text, task=task, batches=batches, batch_size=batch_size,
                          seq_len=seq_len, lm_eval=tasks, limit=limit, threads=threads,
                          device=device, decode_tokens=decode_tokens)
    report = run_eval(sources, options, console)
    print_eval_table(report, console)
    if output:
        save_report(report, output)
        console.print(f"results saved to {output}")


@app.command("export-gguf", epilog=_examples(
    "wft export-gguf tiny  # runs/tiny/tiny-tq2_0.gguf (the recipe's export.type)",
    "wft export-gguf tiny --type tq1_0 --force  # replace an earlier export",
    "wft export-gguf runs/tiny/distill/final --type f16 --output tiny-f16.gguf",
))
@user_errors
def export_gguf(
    source: Annotated[str, typer.Argument(
        help="A recipe (exports its newest stage output) or a wft model directory.")],
    overrides: OverridesArg = None,
    gguf_type: Annotated[Optional[str], typer.Option(
        "--type", help="tq2_0 (CPUs), q2_0 (GPUs; rows of 64), tq1_0, f16 or bf16 (llama.cpp), "
        "or i2_s (BitNet.cpp only); the "
        "architecture follows convert.sub_norm: paper -> bitnet, none -> llama (default: the "
        "recipe's export.type; tq2_0 for a model directory).")] = None,
    output: Annotated[Optional[Path], typer.Option(
        help="Output .gguf file (default: <output_dir>/<name>/<name>-<type>.gguf for a recipe, "
        "beside a model directory otherwise).")] = None,
    validate: Annotated[Optional[bool], typer.Option(
        "--validate/--no-validate", help="Read the file back (and run it in llama.cpp where "
        "installed) before it replaces the output (default: the recipe's export.validate, "
        "else on).")] = None,
    threads: Annotated[int, typer.Option(
        min=1, help="llama.cpp threads for the validation run and its decode speed.")] = 1,
    force: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
):
    """Write a GGUF file: llama.cpp's `bitnet` or `llama` architecture (TQ1_0, TQ2_0, F16,
    BF16) or BitNet.cpp's I2_S. A file that fails a check is not written; exit 1."""
    from wftool.commands.export import print_export_report, resolve_export, run_export

    request = resolve_export(source, overrides, gguf_type, output, validate, force=force)
    with console.status(f"writing {request.output} ..."):
        result = run_export(request.model_dir, request.export_type, request.output,
                            request.validate, request.name, threads)
    print_export_report(result, console)
    if result.problems:
        raise typer.Exit(1)


@app.command(epilog=_examples(
    "wft serve tiny  # the recipe's export (or student), as its serve section says",
    "wft serve runs/tiny/tiny-tq2_0.gguf --port 8080 --threads 4",
    "wft serve runs/tiny/distill/final --backend torch --device cuda",
))
@user_errors
def serve(
    source: Annotated[str, typer.Argument(
        help="A .gguf file (llama.cpp), a wft or Hugging Face model directory (torch), or a "
        "recipe (serves its export or newest student as its `serve` section says).")],
    overrides: OverridesArg = None,
    backend: Annotated[Optional[str], typer.Option(
        help="llamacpp (GGUF files) or torch (model directories); default: from the source.")
    ] = None,
    device: Annotated[Optional[str], typer.Option(
        help="torch backend: auto (a GPU if there is one), cpu, cuda, cuda:1, ...")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to bind (default 127.0.0.1).")
    ] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default 8000; 0 picks a free one).")
    ] = None,
    threads: Annotated[Optional[int], typer.Option(
        help="CPU threads for generation (default: all cores for llama.cpp, torch's default).")
    ] = None,
    max_tokens: Annotated[Optional[int], typer.Option(
        help="Largest max_tokens a request may ask for (default 512).")] = None,
    max_prompt_tokens: Annotated[Optional[int], typer.Option(
        help="Longest prompt accepted, in tokens (default 4096).")] = None,
    max_concurrent: Annotated[Optional[int], typer.Option(
        help="Requests admitted at once (one generates, the rest wait); more get HTTP 429.")
    ] = None,
    model_name: Annotated[Optional[str], typer.Option(
        help="The model id clients see in /v1/models (default: the file or directory name).")
    ] = None,
):
    """OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models)."""
    from wftool.commands.serve import ServeOptions, run_serve

    options = ServeOptions(backend=backend, device=device, host=host, port=port, threads=threads,
                           max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens,
                           max_concurrent=max_concurrent, model_name=model_name)
    run_serve(source, overrides or [], options, console)


@app.command(epilog=_examples(
    "wft pipeline tiny  # teacher, convert, layerwise, pretrain, distill, on a CPU",
    "wft pipeline tiny 'stages=[convert,distill]'  # skip layerwise and pretrain",
    "wft pipeline recipes/byo.yaml  # your model and data",
))
@user_errors
def pipeline(recipe: RecipeArg, overrides: OverridesArg = None):
    """Run the stages a recipe lists, in order, and compare the student to the teacher."""
    config = _load(recipe, overrides, None)
    processes = config.distributed.nproc_per_node * config.distributed.nnodes
    if processes > 1:
        raise WftError(
            f"wft pipeline runs in one process, and the recipe asks for {processes} "
            "(distributed.nproc_per_node x nnodes)",
            "run the stages one by one: wft convert, then wft layerwise / pretrain / distill "
            "RECIPE --nproc-per-node N; or set distributed.nproc_per_node=1")
    check_output_dir(Path(config.output_dir) / config.name, "output_dir")
    from wftool.commands.pipeline import run_pipeline

    run_pipeline(config, console)


@app.command(epilog=_examples("wft doctor"))
@user_errors
def doctor():
    """Versions, CPU/GPU, and which optional backends are installed."""
    from wftool.commands.doctor import print_doctor

    print_doctor(console)


def _register_run_commands() -> None:
    # Imported here: both modules are light (no torch), and keep their own typer signatures.
    from wftool.commands.plot import plot_command
    from wftool.commands.runs import runs_command

    app.command("runs", epilog=_examples(
        "wft runs",
        "wft runs --output-dir /data/runs  # a recipe's output_dir",
    ))(user_errors(runs_command))
    app.command("plot", epilog=_examples(
        "wft plot runs/tiny",
        "wft plot tiny --output curves.png  # a recipe name finds its run folder",
    ))(user_errors(plot_command))


_register_run_commands()


@recipe_app.command("show", epilog=_examples(
    "wft recipe show tiny",
    "wft recipe show tiny --stage distill training.max_steps=50  # distill.training",
))
@user_errors
def recipe_show(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    stage: Annotated[
        Optional[str], typer.Option(help="Resolve overrides relative to this stage's section.")
    ] = None,
):
    """Print the resolved recipe (every default filled in, overrides applied) as YAML."""
    import yaml

    config = _load(recipe, overrides, _check_stage(stage))
    text = yaml.safe_dump(
        config.model_dump(mode="json", by_alias=True), sort_keys=False, allow_unicode=True
    )
    console.print(text, highlight=False, markup=False, end="", soft_wrap=True)


@recipe_app.command("validate", epilog=_examples(
    "wft recipe validate recipes/byo.yaml",
    "wft recipe validate recipes/*.yaml",
))
@user_errors
def recipe_validate(
    recipes: Annotated[list[str], typer.Argument(help="Recipe files or bundled names.")],
):
    """Check recipe files; exit 2 if any is invalid."""
    failed = 0
    for name in recipes:
        try:
            _load(name, [], None)
            console.print(f"[green]ok[/]      {name}")
        except WftError as err:
            failed += 1
            error_console.print(f"[red]invalid[/] {escape(str(err))}", highlight=False)
    if failed:
        raise typer.Exit(2)


@recipe_app.command("schema", epilog=_examples(
    "wft recipe schema > recipe.schema.json  # for your editor's YAML support",
))
def recipe_schema():
    """Print the recipe JSON schema (for editors and CI checks)."""
    import json

    from wftool.recipe.schema import Recipe

    print(json.dumps(Recipe.model_json_schema(by_alias=True), indent=2))


@recipe_app.command("list", epilog=_examples("wft recipe list"))
def recipe_list():
    """List the bundled recipes with their one-line description."""
    from rich.table import Table

    from wftool.recipe.load import bundled_recipes

    table = Table(title="bundled recipes (use the name or a path)", title_justify="left")
    table.add_column("name", style="bold")
    table.add_column("what it does")
    for name, path in bundled_recipes().items():
        table.add_row(name, _first_comment(path))
    console.print(table)


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("# ").strip()
            return text.split(":", 1)[1].strip() if ":" in text else text
    return ""


def _check_stage(stage: str | None) -> str | None:
    from wftool.recipe.schema import STAGES

    if stage is not None and stage not in STAGES:
        raise WftError(f"unknown stage '{stage}'; stages: {', '.join(STAGES)}")
    return stage


def _version() -> str:
    from wftool import __version__

    return __version__


def main() -> None:
    """Console-script entry point."""
    app(prog_name="wft")


if __name__ == "__main__":
    sys.exit(main())
