"""The mask token a unified (AR + masked-diffusion) student denoises, and how it decodes.

`add_mask_token` gives the tokenizer a real `<|mask|>` token and the embedding matrix a row
for it, initialised to the mean embedding (METHOD.md section 7): never an id a word already
uses. `DiffusionSettings` is what a decoder needs to know about how the student was trained;
it travels in config.json (`wft.diffusion`) with the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from wftool.errors import WftError

MASK_TOKEN = "<|mask|>"
DECODE_ATTENTION = ("causal", "bidirectional", "block")


@dataclass(frozen=True)
class DiffusionSettings:
    """How a unified student denoises.

    `shift`: logits at position i-1 predict a masked token at i (AR-to-diffusion
    adaptation keeps the next-token head); else position i predicts itself. `attention`: how
    the student's denoising rows saw each other in training: `causal` (decoding keeps the
    block causal too), `bidirectional`, or `block` (block diffusion: bidirectional within
    a block, causal across blocks; decoding's block is bidirectional). `block_size`: the block length decoding fills at
    once (the training block size for block diffusion).
    """

    mask_token_id: int
    shift: bool = True
    attention: str = "bidirectional"
    block_size: int = 32

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, section: dict) -> DiffusionSettings:
        try:
            settings = cls(**section)
        except TypeError as err:
            raise ValueError(f"bad diffusion section: {err}") from None
        if not isinstance(settings.mask_token_id, int) or settings.mask_token_id < 0:
            raise ValueError(f"mask_token_id {settings.mask_token_id!r} is not a token id")
        if settings.attention not in DECODE_ATTENTION:
            raise ValueError(f"attention {settings.attention!r} is not one of "
                             f"{', '.join(DECODE_ATTENTION)}")
        if not isinstance(settings.block_size, int) or settings.block_size < 1:
            raise ValueError(f"block_size {settings.block_size!r} is not a positive integer")
        return settings


def diffusion_settings(model) -> DiffusionSettings | None:
    """The settings a unified student was saved with; None for any other model."""
    section = getattr(model.config, "wft", None)
    if not isinstance(section, dict) or not section.get("diffusion"):
        return None
    return DiffusionSettings.from_dict(section["diffusion"])


def require_diffusion(model, what: str) -> DiffusionSettings:
    """The settings, or a clear error naming the mode that needs them."""
    settings = diffusion_settings(model)
    if settings is None:
        raise WftError(f"{what} needs a student trained by `wft unified` (this model has no "
                       "mask token)", "decode autoregressively, or train it with `wft unified`")
    return settings


@torch.no_grad()
def add_mask_token(model, tokenizer) -> int:
    """The id of the tokenizer's mask token, adding `<|mask|>` when it has none, and an
    embedding row for it when the model has none (set to the mean embedding, in the input
    and, if untied, the output embeddings). Idempotent: a student that already has one
    keeps it."""
    words = len(tokenizer)
    mask_id = _existing_mask_id(tokenizer)
    if mask_id is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
        mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    elif mask_id < model.get_input_embeddings().weight.shape[0]:
        model.config.mask_token_id = mask_id  # its own row, trained or set before
        return mask_id
    embeddings = model.get_input_embeddings()
    rows = embeddings.weight.shape[0]
    # Real tokens only: rows past the tokenizer (padding of the vocabulary) are untrained.
    used = min(words, rows, mask_id)
    input_mean = embeddings.weight[:used].float().mean(0)
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embeddings.weight
    output_mean = None if output is None or tied else output.weight[:used].float().mean(0)
    if mask_id >= rows:
        model.resize_token_embeddings(mask_id + 1, mean_resizing=False)
        embeddings = model.get_input_embeddings()
        output = model.get_output_embeddings()
    embeddings.weight[mask_id] = input_mean.to(embeddings.weight.dtype)
    if output_mean is not None:
        output.weight[mask_id] = output_mean.to(output.weight.dtype)
        bias = getattr(output, "bias", None)
        if bias is not None:
            bias[mask_id] = bias[:used].mean()
    model.config.mask_token_id = mask_id
    return mask_id


def _existing_mask_id(tokenizer) -> int | None:
    token = getattr(tokenizer, "mask_token", None)
    if not token:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return token_id
