"""`unified`: next-token CE and the masked-diffusion loss in one forward (METHOD.md section 7).

Each micro-batch is split between the objectives (or, in `complementary` mode, its denoising
rows are used twice with complementary masks); all rows go through the model in one
forward, each with its own attention mask: causal for next-token rows, the recipe's
`attention` for denoising rows. The diffusion loss is the LLaDA / MDLM estimator: per row a
noise level t ~ U(eps, 1), each token replaced by the mask token with probability t, CE on
the masked tokens weighted by 1 / t, averaged over the maskable tokens. A curriculum of
phases (by step fraction) sets the diffusion weight and the mask-ratio range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from wftool.model.mask_token import DiffusionSettings
from wftool.recipe.schema import CurriculumPhase, UnifiedStage
from wftool.train.diffusion_masks import (
    block_context_mask,
    maskable_positions,
    sample_noise,
    training_attention_mask,
)
from wftool.train.moe_balance import RouterBalance
from wftool.train.objectives import causal_lm_loss


def masked_diffusion_loss(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                          t: torch.Tensor, shift: bool, maskable: int | torch.Tensor
                          ) -> torch.Tensor:
    """sum over rows r and masked positions i of CE(i) / t_r, divided by `maskable` (the
    number of positions that could have been masked). With `shift` the logits at i-1
    predict the token at i."""
    if shift:
        logits, targets, masked = logits[:, :-1], targets[:, 1:], masked[:, 1:]
    rows = torch.arange(masked.shape[0], device=masked.device)[:, None].expand_as(masked)
    picked = logits[masked].float()  # only masked positions reach the (large) softmax
    ce = F.cross_entropy(picked, targets[masked], reduction="none")
    weighted = ce / t[rows[masked]]
    if torch.is_tensor(maskable):
        return weighted.sum() / maskable.clamp(min=1)
    return weighted.sum() / max(maskable, 1)


def phase_at(curriculum: list[CurriculumPhase], step: int, max_steps: int) -> CurriculumPhase:
    """The phase optimizer step `step` (0-based) belongs to: the first whose `until`
    fraction of `max_steps` lies beyond it."""
    fraction = step / max(max_steps, 1)
    for phase in curriculum:
        if fraction < phase.until:
            return phase
    return curriculum[-1]


def anneal_lookahead(step: int, anneal_steps: int, seq_len: int) -> int:
    """How far ahead denoising rows see at `step` while attention anneals from causal (0)
    to bidirectional (the whole row) over `anneal_steps`."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return seq_len
    return math.floor(seq_len * step / anneal_steps)


class _Clock:
    """A step hook that tells the objective which optimizer step it is computing, and
    logs the curriculum's current weight."""

    name = "unified_curriculum"

    def __init__(self, spec: UnifiedStage, max_steps: int):
        self.spec, self.max_steps = spec, max_steps
        self.step = 0

    def before_step(self, step: int) -> None:
        self.step = step

    def after_step(self, step: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {"dlm_weight": phase_at(self.spec.curriculum, self.step, self.max_steps).dlm_weight}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class UnifiedObjective:
    """`unified`: ar_weight * next-token CE + dlm_weight(phase) * masked-diffusion loss.

    `attention: block` lays each row out as [clean | noisy copies] (`block_context_mask`):
    the clean part gives the next-token loss of every row, the noisy copies the diffusion
    loss, and each noisy block sees the clean tokens of the blocks before it, as cached
    block decoding does. The other attention modes share the rows of a micro-batch
    between the objectives (`split`) in one forward.
    """

    def __init__(self, spec: UnifiedStage, mask_token_id: int, max_steps: int,
                 student: torch.nn.Module | None = None, hooks: tuple = (),
                 balance: RouterBalance | None = None):
        self.spec, self.mask_token_id = spec, mask_token_id
        self.balance = balance or RouterBalance()  # an MoE student's load-balancing loss
        self.clock = _Clock(spec, max_steps)
        self.hooks = (self.clock, *hooks)
        self.student = student  # scored by `held_out` (the trainer's evaluation)
        implementation = getattr(getattr(student, "config", None), "_attn_implementation", None)
        self.additive_masks = implementation == "eager"  # eager adds the mask to the logits

    @property
    def forward_rows_per_row(self) -> float:
        """Tokens the forward runs per batch token (for sizing micro-batches)."""
        copies = 2 if self.spec.mask_mode == "complementary" else 1
        if self.spec.attention == "block":  # [clean | copies], attention over all of it
            return float((1 + copies) ** 2)
        return 1.0 + self.spec.dlm_share if copies == 2 else 1.0

    def settings(self) -> DiffusionSettings:
        """What decoding needs to know, saved with the model."""
        attention = {"anneal": "bidirectional"}.get(self.spec.attention, self.spec.attention)
        return DiffusionSettings(self.mask_token_id, self.spec.shift, attention,
                                 self.spec.block_size)

    def __call__(self, model, batch, progress):
        spec, step = self.spec, self.clock.step
        phase = phase_at(spec.curriculum, step, self.clock.max_steps)
        # Each path records one student forward; `tokens` marks its non-padding positions.
        with self.balance.recording():
            if phase.dlm_weight == 0:
                ar, tokens = self._next_token_loss(model, batch), _padding(batch, slice(None))
                loss, parts = spec.ar_weight * ar, {"ar": ar.detach()}
            else:
                if spec.attention == "block":
                    ar, dlm, _ = self._block_losses(model, batch, phase)
                    tokens = _block_padding(batch, spec.mask_mode)
                else:
                    ar, dlm, tokens = self._split_losses(model, batch, phase, step)
                loss = spec.ar_weight * ar + phase.dlm_weight * dlm
                parts = {"ar": ar.detach(), "dlm": dlm.detach()}
        return self.balance.add(loss, parts, tokens), parts

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        if not self.additive_masks:
            return allowed
        return torch.zeros(allowed.shape, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(torch.float32).min)

    def _next_token_loss(self, model, batch: dict) -> torch.Tensor:
        rows = self._next_token_rows(batch, slice(None))
        return causal_lm_loss(model(**rows, use_cache=False).logits, batch["labels"])

    def _next_token_rows(self, batch: dict, rows: slice) -> dict:
        positions = batch["position_ids"][rows]
        allowed = training_attention_mask(positions, "causal", padding=_padding(batch, rows))
        return {"input_ids": batch["input_ids"][rows], "position_ids": positions,
                "attention_mask": self._mask(allowed)}

    def _noise(self, batch: dict, rows: slice, phase: CurriculumPhase,
               generator: torch.Generator | None = None):
        """(maskable [rows, seq], t per copy, masked per copy): one copy, or two with
        complementary masks (weights 1/t and 1/(1-t))."""
        spec = self.spec
        eligible = maskable_positions(batch["labels"][rows], batch["position_ids"][rows],
                                      spec.shift)
        low, high = phase.mask_ratio or (spec.mask_eps, 1.0)
        low = max(low, spec.mask_eps)
        if spec.mask_mode == "complementary":  # 1 - t must stay >= eps as well
            high = max(min(high, 1.0 - spec.mask_eps), low)
        t, masked = sample_noise(eligible, low, high, generator)
        if spec.mask_mode != "complementary":
            return eligible, [t], [masked]
        return eligible, [t, 1.0 - t], [masked, eligible & ~masked]

    def _split_losses(self, model, batch: dict, phase: CurriculumPhase, step: int):
        rows = batch["input_ids"].shape[0]
        if rows == 1:  # one row: it trains both objectives (the forward doubles)
            ar_rows, dlm_rows = slice(0, 1), slice(0, 1)
        else:
            denoised = min(max(round(rows * self.spec.dlm_share), 1), rows - 1)
            ar_rows, dlm_rows = slice(0, rows - denoised), slice(rows - denoised, rows)
        noise = self._denoising_rows(batch, dlm_rows, phase, step)
        pieces = [self._next_token_rows(batch, ar_rows), noise]
        inputs = {key: torch.cat([piece[key] for piece in pieces])
                  for key in ("input_ids", "position_ids", "attention_mask")}
        logits = model(**inputs, use_cache=False).logits
        n_ar = pieces[0]["input_ids"].shape[0]
        ar = causal_lm_loss(logits[:n_ar], batch["labels"][ar_rows])
        dlm = masked_diffusion_loss(logits[n_ar:], noise["targets"], noise["masked"],
                                    noise["t"], self.spec.shift, noise["maskable"])
        padding = _padding(batch, slice(None))
        if padding is not None:  # the forward's rows: next-token rows, then noisy copies
            copies = noise["input_ids"].shape[0] // padding[dlm_rows].shape[0]
            padding = torch.cat([padding[ar_rows], padding[dlm_rows].repeat(copies, 1)])
        return ar, dlm, padding

    def _denoising_rows(self, batch: dict, rows: slice, phase: CurriculumPhase, step: int,
                        generator: torch.Generator | None = None) -> dict:
        """Noisy copies of `rows` stacked as rows, with the recipe's attention."""
        spec = self.spec
        eligible, ts, masks = self._noise(batch, rows, phase, generator)
        copies = len(masks)
        ids = batch["input_ids"][rows].repeat(copies, 1)
        positions = batch["position_ids"][rows].repeat(copies, 1)
        padding = _padding(batch, rows)
        padding = None if padding is None else padding.repeat(copies, 1)
        masked = torch.cat(masks)
        lookahead = anneal_lookahead(step, spec.anneal_steps, ids.shape[1])
        allowed = training_attention_mask(positions, spec.attention, padding=padding,
                                          block_size=spec.block_size, lookahead=lookahead)
        noisy = torch.where(masked, torch.full_like(ids, self.mask_token_id), ids)
        return {"input_ids": noisy, "position_ids": positions,
                "attention_mask": self._mask(allowed), "targets": ids, "masked": masked,
                "t": torch.cat(ts), "maskable": eligible.sum() * copies}

    def _block_losses(self, model, batch: dict, phase: CurriculumPhase,
                      generator: torch.Generator | None = None):
        """(next-token loss on the clean part, diffusion loss on the noisy copies,
        masked-token accuracy) of rows laid out as [clean | noisy copies]."""
        spec = self.spec
        ids, positions = batch["input_ids"], batch["position_ids"]
        eligible, ts, masks = self._noise(batch, slice(None), phase, generator)
        noisy = [torch.where(m, torch.full_like(ids, self.mask_token_id), ids) for m in masks]
        allowed = block_context_mask(positions, len(masks), spec.block_size,
                                     padding=batch.get("attention_mask"))
        logits = model(input_ids=torch.cat([ids, *noisy], 1),
                       position_ids=positions.repeat(1, 1 + len(masks)),
                       attention_mask=self._mask(allowed), use_cache=False).logits
        seq = ids.shape[1]
        clean = logits[:, :seq]
        ar = causal_lm_loss(clean, batch["labels"])
        total, right, scored = 0.0, 0.0, torch.zeros((), device=ids.device)
        for copy, (t, masked) in enumerate(zip(ts, masks), start=1):
            predicted, targets, hidden = block_predictions(
                clean, logits[:, copy * seq:(copy + 1) * seq], ids, masked, positions,
                spec.block_size, spec.shift)
            total = total + masked_diffusion_loss(predicted, targets, hidden, t, False, 1)
            right = right + masked_accuracy(predicted, targets, hidden, False) * hidden.sum()
            scored = scored + hidden.sum()
        dlm = total / (eligible.sum() * len(masks)).clamp(min=1)
        return ar, dlm, right / scored.clamp(min=1)

    @torch.no_grad()
    def held_out(self, outputs, batch) -> dict[str, torch.Tensor]:
        """The diffusion loss and masked-token accuracy on a held-out batch, with masks
        drawn from a generator seeded by the batch (the same at every evaluation)."""
        if self.student is None:
            return {}
        generator = torch.Generator().manual_seed(int(batch["input_ids"].sum()) % (1 << 62))
        phase = self.spec.curriculum[-1]
        if self.spec.attention == "block":
            _, dlm, accuracy = self._block_losses(self.student, batch, phase, generator)
            return {"dlm": dlm, "dlm_accuracy": accuracy}
        noise = self._denoising_rows(batch, slice(None), phase, self.clock.step, generator)
        logits = self.student(input_ids=noise["input_ids"], position_ids=noise["position_ids"],
                              attention_mask=noise["attention_mask"], use_cache=False).logits
        dlm = masked_diffusion_loss(logits, noise["targets"], noise["masked"], noise["t"],
                                    self.spec.shift, noise["maskable"])
        return {"dlm": dlm, "dlm_accuracy": masked_accuracy(logits, noise["targets"],
                                                            noise["masked"], self.spec.shift)}


def block_predictions(clean: torch.Tensor, noisy: torch.Tensor, targets: torch.Tensor,
                      masked: torch.Tensor, positions: torch.Tensor, block_size: int,
                      shift: bool):
    """(logits, targets, masked) aligned position by position for a noisy copy of a
    block-diffusion row. With the shift a block's first token is predicted by the clean
    token before it (block decoding takes it from the finished sequence), every other by
    the noisy position before it."""
    if not shift:
        return noisy, targets, masked
    starts = (positions[:, 1:] % block_size == 0)[..., None]
    return (torch.where(starts, clean[:, :-1], noisy[:, :-1]), targets[:, 1:], masked[:, 1:])


def masked_accuracy(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor,
                    shift: bool) -> torch.Tensor:
    """Share of masked tokens whose argmax prediction is right (the mask token excluded
    from nothing: a model that predicts it is simply wrong)."""
    if shift:
        logits, targets, masked = logits[:, :-1], targets[:, 1:], masked[:, 1:]
    picked = logits[masked].argmax(-1)
    right = (picked == targets[masked]).sum()
    return right.float() / masked.sum().clamp(min=1)


def _padding(batch: dict, rows: slice) -> torch.Tensor | None:
    padding = batch.get("attention_mask")
    return None if padding is None else padding[rows]


def _block_padding(batch: dict, mask_mode: str) -> torch.Tensor | None:
    """The padding of a [clean | noisy copies] row laid out by `_block_losses`."""
    padding = batch.get("attention_mask")
    copies = 2 if mask_mode == "complementary" else 1
    return None if padding is None else padding.repeat(1, 1 + copies)
