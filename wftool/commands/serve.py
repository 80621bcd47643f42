"""`wft serve`: pick what to serve and how, load it, and run the HTTP app under uvicorn."""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError
from rich.console import Console

from wftool.errors import WftError
from wftool.model.checkpoint import model_directory
from wftool.recipe.schema import ServeStage

if TYPE_CHECKING:
    import torch


@dataclass
class ServeOptions:
    """Command-line values; None means "the recipe's, else the default"."""

    backend: str | None = None
    device: str | None = None
    host: str | None = None
    port: int | None = None
    threads: int | None = None
    max_tokens: int | None = None
    max_prompt_tokens: int | None = None
    max_concurrent: int | None = None
    model_name: str | None = None


@dataclass
class ServeTarget:
    path: Path
    settings: ServeStage
    model_id: str
    device: torch.device | None = None  # where the torch backend runs; None for llamacpp


def _model_id(path: Path) -> str:
    if path.suffix == ".gguf":
        return path.stem
    if path.name == "final":  # runs/<recipe>/<stage>/final -> <recipe>-<stage>
        return f"{path.parent.parent.name}-{path.parent.name}"
    return path.name


def _settings(base: ServeStage, options: ServeOptions) -> ServeStage:
    given = {k: v for k, v in asdict(options).items() if v is not None and k != "model_name"}
    try:
        return ServeStage.model_validate({**base.model_dump(), **given})
    except ValidationError as err:
        first = err.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-")
        raise WftError(f"{option}: {first['msg']} (got {first.get('input')!r})") from None


def resolve_target(source: str, overrides: list[str], options: ServeOptions) -> ServeTarget:
    """A GGUF file -> llamacpp, a model directory -> torch, a recipe -> its `serve` section
    and the export (llamacpp) or newest stage output (torch) it produced."""
    path = Path(source)
    is_recipe_file = path.suffix in (".yaml", ".yml")
    path = model_directory(path) or path  # a stage folder serves its final/
    if (path.is_file() and not is_recipe_file) or (path / "config.json").exists():
        if overrides:
            raise WftError("overrides apply to recipes, not to a model file or directory")
        inferred = "llamacpp" if path.is_file() else "torch"
        settings = _settings(ServeStage(backend=inferred), options)
        if settings.backend == "llamacpp" and not path.is_file():
            raise WftError(f"{path} is a model directory; the llamacpp backend serves GGUF files",
                           f"`wft export-gguf {path}` first, or serve it with --backend torch")
        if settings.backend == "torch" and path.is_file():
            raise WftError(f"{path} is a file; the torch backend serves wft or Hugging Face "
                           "model directories", "serve GGUF files with --backend llamacpp")
        if path.is_file() and path.suffix != ".gguf":
            raise WftError(f"{path} is not a .gguf file or a model directory")
        return ServeTarget(path, settings, options.model_name or _model_id(path),
                           _device(settings, options, "--device"))
    if path.suffix in (".gguf",) or path.name == "config.json":
        raise WftError(f"{path} does not exist")
    if path.is_dir():
        raise WftError(f"{path} has no config.json (nor final/config.json): not a model "
                       "directory")

    from wftool.commands.export import export_source, recipe_gguf_path
    from wftool.recipe.load import load_recipe

    recipe = load_recipe(source, overrides, stage="serve")
    settings = _settings(recipe.serve, options)
    if settings.backend == "llamacpp":
        gguf = recipe_gguf_path(recipe)
        if not gguf.is_file():
            raise WftError(f"{recipe.name} has no {recipe.export.type} export at {gguf} yet",
                           f"run `wft export-gguf {source}` first, or serve the checkpoint "
                           "with --backend torch")
        return ServeTarget(gguf, settings, options.model_name or recipe.name)
    return ServeTarget(export_source(recipe), settings, options.model_name or recipe.name,
                       _device(settings, options, "serve.device"))


def _device(settings: ServeStage, options: ServeOptions, default_origin: str):
    """The torch backend's device, checked before the port is bound and the model loads; an
    error names --device, or the recipe's `serve.device` when the flag was not given."""
    if settings.backend != "torch":
        return None
    from wftool.model.loading import resolve_device

    origin = "--device" if options.device is not None else default_origin
    return resolve_device(settings.device, origin)


def load_engine(target: ServeTarget):
    settings = target.settings
    if settings.backend == "llamacpp":
        from wftool.serve.engine_llamacpp import LlamaCppEngine

        context = settings.max_prompt_tokens + settings.max_tokens
        return LlamaCppEngine(target.path, settings.threads, context)
    from wftool.model.loading import resolve_device
    from wftool.serve.engine_torch import TorchEngine

    device = target.device if target.device is not None else resolve_device(settings.device)
    return TorchEngine.load(target.path, settings.threads, device)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a taken port fails fast."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise WftError(f"cannot listen on {host}:{port}: {err.strerror}",
                       "pick another --port (0 takes any free one)") from None
    return sock


def _print_decodings(engine, console: Console) -> None:
    """Say when a unified student can also decode by diffusion, or why it cannot."""
    diffusion = getattr(engine, "diffusion", None)
    if diffusion is None:
        return
    problem = getattr(engine, "diffusion_problem", None)
    if problem:
        console.print(f"[yellow]warning:[/] a unified student, but diffusion decoding cannot "
                      f"run on it: {problem}", highlight=False)
        return
    console.print(f'decoding: "ar" (default), "diffusion", "speculative" (request field '
                  f'"decoding"; block size {diffusion.block_size}, {diffusion.attention})',
                  highlight=False, soft_wrap=True)


def run_serve(source: str, overrides: list[str], options: ServeOptions, console: Console) -> None:
    try:
        import uvicorn

        from wftool.serve.app import Limits, create_app
    except ImportError:
        raise WftError("`wft serve` needs its HTTP server packages",
                       "pip install 'wftool[serve]' (add llamacpp for GGUF files)") from None

    target = resolve_target(source, overrides, options)
    settings = target.settings
    sock = bind(settings.host, settings.port)
    with console.status(f"loading {target.path} ({settings.backend}) ..."):
        engine = load_engine(target)
    limits = Limits(settings.max_tokens, settings.max_prompt_tokens, settings.max_concurrent)
    app = create_app(engine, target.model_id, settings.backend, limits)
    host, port = sock.getsockname()[:2]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    console.print(f"[green]serving[/] {target.model_id} ({settings.backend}, "
                  f"{target.path}) on {url}/v1", highlight=False, soft_wrap=True)
    _print_decodings(engine, console)
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        console.print("[yellow]warning:[/] listening beyond this machine; the API has no "
                      "authentication", highlight=False)
    console.print(f"try: curl {url}/v1/completions -H 'Content-Type: application/json' "
                  f"-d '{{\"prompt\": \"Hello\", \"max_tokens\": 16}}'", highlight=False,
                  soft_wrap=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
