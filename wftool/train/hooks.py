"""Work that runs around each optimizer step: the quantization and Q-Sparse warm-ups, the
unified curriculum's clock, QK-clip (wftool.train.qk_clip); MoE load balancing belongs here too.

A hook's `before_step` runs before the step's first forward, `after_step` right after the
optimizer update (the place to rescale weights); `metrics` adds host-side numbers to the
step's record. Its `state_dict` travels in every checkpoint, so a resumed run continues
exactly where it stopped.

Under FSDP2 a hook's model holds row shards of each matrix: `wftool.train.muon.local_rows`
and `scale_rows` let an after-step rescale (a per-head QK-clip on q_proj / k_proj rows) act
on the rows each process holds, with no gather.
"""

from __future__ import annotations

import math
from typing import Protocol

from torch import nn

from wftool.model.surgery import current_quant_mix, set_quant_mix
from wftool.quant.q_sparse import current_q_sparsity, set_q_sparsity


class StepHook(Protocol):
    name: str

    def before_step(self, step: int) -> None: ...

    def after_step(self, step: int) -> None: ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class QuantWarmup:
    """One warm-up across the student's life: the blend between latent (0) and ternary (1)
    weights rises by 1 / `steps` per optimizer step from the mix the stage started with (the
    input model's), so a later stage continues the ramp instead of restarting it. With
    `steps` = 0 the student is fully ternary from the first step."""

    name = "quant_warmup"

    def __init__(self, model: nn.Module, steps: int):
        self.model = model
        self.steps = steps
        self.start = current_quant_mix(model)
        self.mix = self.start

    def mix_at(self, step: int) -> float:
        """The mix in effect during optimizer step `step` (0-based) of this stage."""
        if self.steps <= 0:
            return 1.0
        return min(1.0, self.start + (step + 1) / self.steps)

    def before_step(self, step: int) -> None:
        mix = self.mix_at(step)
        if mix != self.mix:  # past the ramp nothing changes: skip the walk over modules
            self.mix = mix
            set_quant_mix(self.model, mix)

    def after_step(self, step: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        warming = self.steps > 0 or self.start < 1.0
        return {"quant_mix": self.mix} if warming else {}

    def state_dict(self) -> dict:
        return {"start": self.start, "mix": self.mix}

    def resume_per_stage_ramp(self, step: int) -> None:
        """A checkpoint written before the mix was saved: its stage ramped from 0."""
        self.start = 0.0
        self.mix = self.mix_at(step - 1) if step else 0.0
        set_quant_mix(self.model, self.mix)

    def load_state_dict(self, state: dict) -> None:
        self.start, self.mix = float(state["start"]), float(state["mix"])
        set_quant_mix(self.model, self.mix)


class QSparseWarmup:
    """Q-Sparse's activation sparsity rises linearly from the input model's to `target`
    over `steps` optimizer steps of the stage (at once with `steps` = 0). Set in a few
    discrete levels: every distinct value is a different top-K, and a recompile under
    torch.compile (whose default limit is 8 per function)."""

    name = "q_sparse_warmup"
    LEVELS = 4

    def __init__(self, model: nn.Module, target: float, steps: int):
        self.model, self.target, self.steps = model, target, steps
        self.start = current_q_sparsity(model)
        self.sparsity = self.start

    def sparsity_at(self, step: int) -> float:
        if self.steps <= 0 or step + 1 >= self.steps:
            return self.target
        done = math.floor((step + 1) / self.steps * self.LEVELS) / self.LEVELS
        return self.start + (self.target - self.start) * done

    def before_step(self, step: int) -> None:
        sparsity = self.sparsity_at(step)
        if sparsity != self.sparsity:
            self.sparsity = sparsity
            set_q_sparsity(self.model, sparsity)

    def after_step(self, step: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {"q_sparsity": self.sparsity}

    def state_dict(self) -> dict:
        return {"start": self.start, "sparsity": self.sparsity}

    def load_state_dict(self, state: dict) -> None:
        self.start, self.sparsity = float(state["start"]), float(state["sparsity"])
        set_q_sparsity(self.model, self.sparsity)
