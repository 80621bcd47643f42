"""llama.cpp through llama-cpp-python: importing it, reading a GGUF's trained context, and
opening a file, each with the error a user can act on.

llama-cpp-python is optional (`pip install 'wftool[llamacpp]'`), so it is imported here, when a
GGUF file is about to run, never at module import.
"""

from __future__ import annotations

from pathlib import Path

from wftool.errors import WftError

INSTALL_HINT = "pip install 'wftool[llamacpp]' (builds llama.cpp: ~6-13 min on 2 cores)"
# What a load failure most often means for a file wft wrote: its I2_S tensors (GGML type 36)
# belong to BitNet.cpp, which upstream llama.cpp does not know; Q2_0 (type 42) needs a
# llama.cpp from 2026 on.
LOAD_HINT = ("wft's I2_S files load only in BitNet.cpp (extern/BitNet); Q2_0 files need "
             "llama-cpp-python 0.3.36 or newer")


def llamacpp_available() -> bool:
    """Whether llama-cpp-python is installed (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def import_llama(purpose: str = "running a GGUF file", alternative: str | None = None):
    """The `llama_cpp.Llama` class; a WftError saying how to install it where it is missing.
    `purpose` starts the message ("<purpose> needs llama-cpp-python"); `alternative`, if
    given, is appended to the install hint (", or <alternative>")."""
    try:
        from llama_cpp import Llama
    except ImportError:
        hint = INSTALL_HINT + (f", or {alternative}" if alternative else "")
        raise WftError(f"{purpose} needs llama-cpp-python", hint) from None
    return Llama


def gguf_context_length(path: str | Path) -> int | None:
    """`<arch>.context_length` from the GGUF header: the context the model was trained with.
    None if the file does not say or is not a readable GGUF: then llama.cpp decides."""
    from wftool.export.gguf_layout import read_gguf_layout

    try:
        metadata = read_gguf_layout(path).metadata
    except (OSError, ValueError):
        return None
    value = metadata.get(f"{metadata.get('general.architecture')}.context_length")
    return int(value) if value is not None else None


def open_llama(path: str | Path, n_ctx: int, threads: int, logits_all: bool = False):
    """A `llama_cpp.Llama` for the GGUF at `path` with a context of `n_ctx` tokens (0: the
    trained one) and `threads` threads for prompt and generation; `logits_all` keeps the
    logits of every position (scoring). A file llama.cpp cannot load is a WftError."""
    Llama = import_llama(f"running {path} (a GGUF file)")
    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads,
                     n_threads_batch=threads, logits_all=logits_all, verbose=False)
    except (ValueError, RuntimeError) as err:
        if "llama_context" in str(err):  # "Failed to create llama_context": the KV cache
            hint = f"a context of {n_ctx} tokens may not fit in memory: ask for a shorter one"
        else:
            hint = LOAD_HINT
        raise WftError(f"llama.cpp cannot load {path}: {err}", hint) from None
