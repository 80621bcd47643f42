"""Which decoding a request gets: its `decoding` fields, checked against what is served.

Diffusion and speculative decoding need a unified student (one with a mask token, from
`wft unified`) and wft's own torch runtime; llama.cpp decodes autoregressively only. A
tuning field sent for a mode that does not read it is refused rather than ignored.
"""

from __future__ import annotations

from wftool.decoding.modes import AUTOREGRESSIVE, DEFAULT_THRESHOLD, Decoding
from wftool.serve.errors import ApiError

DIFFUSION_FIELDS = ("diffusion_block_size", "diffusion_threshold", "diffusion_steps_per_block")
# The tuning fields each mode reads.
_READS = {"ar": (), "diffusion": DIFFUSION_FIELDS, "speculative": ("diffusion_block_size",)}


def available_decodings(engine, backend: str) -> list[str]:
    """The `decoding` values this server accepts."""
    if backend != "torch" or getattr(engine, "diffusion", None) is None \
            or getattr(engine, "diffusion_problem", None):
        return ["ar"]
    return list(_READS)


def request_decoding(body, engine, backend: str) -> Decoding:
    """The Decoding a validated request body asks for, or a 400 naming the field and fix."""
    mode = body.decoding
    for name in DIFFUSION_FIELDS:
        if getattr(body, name) is not None and name not in _READS[mode]:
            readers = " or ".join(f'"{m}"' for m, fields in _READS.items() if name in fields)
            raise ApiError(400, f'{name} applies to decoding {readers}, not "{mode}"',
                           param=name)
    if mode == "ar":
        return AUTOREGRESSIVE
    if backend != "torch":
        raise ApiError(400, f'decoding "{mode}": diffusion decoding runs only in wft\'s torch '
                       "runtime; serve the model directory with `wft serve --backend torch`",
                       param="decoding")
    if getattr(engine, "diffusion", None) is None:
        raise ApiError(400, f'decoding "{mode}" needs a student trained by `wft unified` '
                       '(this model has no mask token); use decoding "ar", or train it with '
                       "`wft unified`", param="decoding")
    problem = getattr(engine, "diffusion_problem", None)
    if problem:
        raise ApiError(400, f'decoding "{mode}" cannot run on this model: {problem}',
                       param="decoding")
    threshold = body.diffusion_threshold
    return Decoding(mode, body.diffusion_block_size,
                    DEFAULT_THRESHOLD if threshold is None else threshold,
                    body.diffusion_steps_per_block)
