import math

import pytest
import torch

from tests.conftest import tiny_llama
from wftool.recipe.schema import TrainingSpec
from wftool.train.optim import build_optimizers, lr_factor


def test_cosine_schedule_closed_form():
    spec = TrainingSpec(max_steps=110, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, spec) == pytest.approx(0.1)
    assert lr_factor(9, spec) == pytest.approx(1.0)
    assert lr_factor(10, spec) == pytest.approx(1.0)
    assert lr_factor(60, spec) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, spec) == pytest.approx(0.1)


def test_wsd_schedule_is_flat_then_decays_linearly():
    spec = TrainingSpec(max_steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2,
                        min_lr_ratio=0.0)
    assert lr_factor(50, spec) == 1.0 and lr_factor(79, spec) == 1.0
    assert lr_factor(89, spec) == pytest.approx(0.5)
    assert lr_factor(99, spec) == pytest.approx(0.0)


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = tiny_llama()
    muon, adamw = build_optimizers(model, TrainingSpec(optimizer="muon"))
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    adamw_ids = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert not muon_ids & adamw_ids
    assert id(model.model.embed_tokens.weight) in adamw_ids
    assert id(model.model.layers[0].self_attn.q_proj.weight) in muon_ids
    assert id(model.model.norm.weight) in adamw_ids
    everything = {id(p) for p in model.parameters()}
    assert muon_ids | adamw_ids == everything
