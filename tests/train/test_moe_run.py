"""A fake MoE student end to end: convert a dense model with `convert.moe`, pretrain it with
ternary experts and the router's balancing loss, reload it, and run it as a server would."""

import torch

from tests.train.conftest import small_recipe
from wftool.commands.convert import run_convert
from wftool.decoding import Decoding, decode
from wftool.model.checkpoint import load_model_dir
from wftool.quant.bit_experts import BitExperts
from wftool.recipe import load_recipe
from wftool.serve.engine_torch import TorchEngine
from wftool.train.metrics import read_metrics
from wftool.train.stages import run_pretrain


def test_a_fake_moe_student_trains_balances_and_reloads(tmp_path):
    recipe = load_recipe(small_recipe(tmp_path), [
        "convert.moe.experts=4", "convert.moe.top_k=2", "pretrain.training.max_steps=10",
        "pretrain.training.lr=3e-3", "pretrain.training.router_aux_loss_weight=0.02"])
    converted = run_convert(recipe)
    assert converted.moe_logit_diff is not None and converted.moe_logit_diff < 1e-4
    result = run_pretrain(recipe)
    records = read_metrics(result.final_dir.parent / "metrics.jsonl")
    losses = [r["loss_ce"] for r in records]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert all(r["loss_moe_aux"] > 0 and 1.0 <= r["loss_expert_load"] <= 2.0 for r in records)
    student, _, meta = load_model_dir(result.final_dir)
    assert meta.family == "mixtral"
    experts = student.model.layers[0].mlp.experts
    assert isinstance(experts, BitExperts)
    # Training made the experts differ (they started as copies of one FFN).
    assert not torch.equal(experts.gate_up_proj[0], experts.gate_up_proj[1])
    engine = TorchEngine.load(result.final_dir)
    tokens = list(decode(engine.model, engine.encode("kiza pa", chat=False), 6, Decoding("ar")))
    assert len(tokens) == 6


def test_a_moe_student_trains_under_bf16_autocast_with_fp32_masters(tmp_path):
    """The GPU path on a CPU: ternary experts, routers and the balancing loss under bf16
    autocast; the checkpoint keeps fp32 latent experts and fp32 optimizer state."""
    from tests.train.test_precision import _saved_float_dtypes

    recipe = load_recipe(small_recipe(tmp_path), [
        "convert.moe.experts=4", "pretrain.training.max_steps=4",
        "pretrain.training.save_every=4", "pretrain.training.precision=bf16"])
    run_convert(recipe)
    result = run_pretrain(recipe)
    records = read_metrics(result.final_dir.parent / "metrics.jsonl")
    assert all(torch.isfinite(torch.tensor([r["loss"], r["loss_moe_aux"]])).all()
               for r in records)
    assert _saved_float_dtypes(result.final_dir.parent / "step-4") == {
        "model": {torch.float32}, "optim": {torch.float32}}
    student, _, _ = load_model_dir(result.final_dir)
    assert student.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
