"""Work that runs around each optimizer step: the quantization warm-up today; QK-clip and
MoE load balancing belong here too.

A hook's `before_step` runs before the step's first forward, `after_step` right after the
optimizer update (the place to rescale weights); `metrics` adds host-side numbers to the
step's record. Its `state_dict` travels in every checkpoint, so a resumed run continues
exactly where it stopped.

Under FSDP2 a hook's model holds row shards of each matrix: `wftool.train.muon.local_rows`
and `scale_rows` let an after-step rescale (a per-head QK-clip on q_proj / k_proj rows) act
on the rows each process holds, with no gather.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from wftool.model.surgery import current_quant_mix, set_quant_mix


class StepHook(Protocol):
    name: str

    def before_step(self, step: int) -> None: ...

    def after_step(self, step: int) -> None: ...

    def metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def resume_per_stage_ramp(self, step: int) -> None:
        """A checkpoint written before the mix was saved: its stage ramped from 0."""
        self.start = 0.0
        self.mix = self.mix_at(step - 1) if step else 0.0
        set_quant_mix(self.model, self.mix)

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
