"""MoE students train with the router's load-balancing loss and log how evenly they route."""

from pathlib import Path

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from tests.conftest import tiny_llama
from tests.train.conftest import small_recipe
from wftool.recipe import load_recipe
from wftool.recipe.schema import DistillStage, LayerwiseStage, TrainingSpec, UnifiedStage
from wftool.train.metrics import read_metrics
from wftool.train.moe_balance import (
    RouterBalance,
    expert_load,
    is_moe,
    router_aux_weight,
    router_balance,
)
from wftool.train.objectives import (
    Distillation,
    LanguageModeling,
    LayerwiseDistillation,
    causal_lm_loss,
)
from wftool.train.optim import build_optimizers
from wftool.train.unified import UnifiedObjective

MIXTRAL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, num_local_experts=4,
               num_experts_per_tok=2, max_position_embeddings=64)
WEIGHT = 0.25


def _mixtral(seed=0):
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(**MIXTRAL)).eval()


def _batch(rows=2, seq=10, padded=True):
    torch.manual_seed(1)
    ids = torch.randint(0, 120, (rows, seq))
    mask = torch.ones(rows, seq, dtype=torch.long)
    if padded:
        mask[0, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _balance(model):
    return RouterBalance(model, WEIGHT)


def test_loss_is_ce_plus_weighted_transformers_aux_loss():
    model, batch = _mixtral(), _batch()
    loss, parts = LanguageModeling(_balance(model))(model, batch, 0.0)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_router_logits=True)
    ce = causal_lm_loss(out.logits, batch["labels"])
    assert loss.item() == pytest.approx((ce + WEIGHT * out.aux_loss).item(), abs=1e-6)
    assert parts["moe_aux"].item() == pytest.approx(out.aux_loss.item(), abs=1e-6)
    assert set(parts) == {"ce", "moe_aux", "expert_load"}
    load = expert_load(out.router_logits, 2, batch["attention_mask"])
    assert parts["expert_load"].item() == pytest.approx(load.item())
    assert 1.0 <= parts["expert_load"].item() <= 2.0


def test_the_aux_loss_trains_the_routers():
    model = _mixtral()
    loss, _ = LanguageModeling(_balance(model))(model, _batch(), 0.0)
    loss.backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_expert_load_is_one_when_balanced_and_experts_over_top_k_when_collapsed():
    # 4 experts, top-2: half the tokens pick experts {0, 1}, the other half {2, 3}.
    balanced = torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.0, 0.0, 5.0, 4.0]]).repeat(3, 1)
    collapsed = torch.tensor([[5.0, 4.0, 0.0, 0.0]]).repeat(6, 1)
    assert expert_load((balanced, balanced), top_k=2).item() == pytest.approx(1.0)
    assert expert_load((collapsed, collapsed), top_k=2).item() == pytest.approx(4 / 2)
    # Averaged over layers; padding tokens do not count.
    assert expert_load((balanced, collapsed), top_k=2).item() == pytest.approx(1.5)
    mixed = torch.cat([balanced, collapsed])
    padding = torch.tensor([[1] * 6, [0] * 6])
    assert expert_load((mixed,), top_k=2, attention_mask=padding).item() == pytest.approx(1.0)


def test_a_dense_model_is_untouched():
    model, batch = tiny_llama(), _batch(padded=False)
    spec = TrainingSpec(router_aux_loss_weight=0.5)
    assert not is_moe(model) and is_moe(_mixtral())
    plain_loss, plain_parts = LanguageModeling()(model, batch, 0.0)
    loss, parts = LanguageModeling(router_balance(model, spec))(model, batch, 0.0)
    assert set(parts) == set(plain_parts) == {"ce"}
    assert torch.equal(loss, plain_loss)


def test_the_weight_comes_from_the_recipe_else_the_config():
    model = _mixtral()
    assert router_aux_weight(model, TrainingSpec(router_aux_loss_weight=0.3)) == 0.3
    assert router_aux_weight(model, TrainingSpec()) == model.config.router_aux_loss_coef
    assert router_aux_weight(tiny_llama(), TrainingSpec()) == 0.0


def _added_term(loss, parts, *names):
    return (loss - sum(parts[name] for name in names)).item()


def test_distillation_objectives_add_the_balance_term():
    student, teacher, batch = _mixtral(), _mixtral(seed=1), _batch()
    layerwise = LayerwiseDistillation(teacher, LayerwiseStage(), 2, _balance(student))
    loss, parts = layerwise(student, batch, 0.0)
    assert {"hidden", "moe_aux", "expert_load"} <= set(parts)
    assert _added_term(loss, parts, "hidden") == pytest.approx(
        WEIGHT * parts["moe_aux"].item(), abs=1e-6)
    spec = DistillStage(attention_weight=0.0, logits_weight=1.0)
    distill = Distillation(teacher, spec, None, None, 2, 2, _balance(student))
    loss, parts = distill(student, batch, 0.0)
    assert {"ce", "kl", "moe_aux", "expert_load"} <= set(parts)
    assert _added_term(loss, parts, "ce", "kl") == pytest.approx(
        WEIGHT * parts["moe_aux"].item(), abs=1e-6)


@pytest.mark.parametrize("attention", ["bidirectional", "block"])
def test_unified_objective_adds_the_balance_term_with_4d_masks(attention):
    model, mask_id = _mixtral(), MIXTRAL["vocab_size"] - 1
    rows, seq = 2, 8
    torch.manual_seed(2)
    ids = torch.randint(0, mask_id, (rows, seq))
    batch = {"input_ids": ids, "labels": ids.clone(),
             "position_ids": torch.arange(seq).repeat(rows, 1)}
    spec = UnifiedStage(attention=attention, block_size=4)
    objective = UnifiedObjective(spec, mask_id, 10, student=model, balance=_balance(model))
    objective.clock.before_step(9)
    loss, parts = objective(model, batch, 0.9)
    assert {"ar", "dlm", "moe_aux", "expert_load"} <= set(parts)
    dlm_weight = spec.curriculum[-1].dlm_weight
    expected = spec.ar_weight * parts["ar"] + dlm_weight * parts["dlm"]
    assert (loss - expected).item() == pytest.approx(WEIGHT * parts["moe_aux"].item(), abs=1e-5)


def test_muon_leaves_3d_expert_tensors_to_adamw_with_weight_decay():
    model = _mixtral()
    muon, adamw = build_optimizers(model, TrainingSpec(optimizer="muon", weight_decay=0.1))
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in adamw.param_groups for p in g["params"]}
    experts = model.model.layers[0].mlp.experts
    for tensor in (experts.gate_up_proj, experts.down_proj):
        assert tensor.ndim == 3 and decay[id(tensor)] == 0.1 and id(tensor) not in muon_ids
    assert id(model.model.layers[0].mlp.gate.weight) in muon_ids  # the 2-D router
    assert muon_ids | set(decay) == {id(p) for p in model.parameters()}
    LanguageModeling(_balance(model))(model.train(), _batch(), 0.0)[0].backward()
    for optimizer in (muon, adamw):
        optimizer.step()


def test_pretrain_of_a_mixtral_logs_the_balance_and_learns(tmp_path):
    from wftool.train.stages import run_pretrain

    config = {"model_type": "mixtral", "vocab_size": 512, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4, "num_local_experts": 4, "num_experts_per_tok": 2,
              "max_position_embeddings": 128}
    training = {"max_steps": 8, "micro_batch_size": 4, "lr": 3e-3, "warmup_steps": 1,
                "save_every": 8, "eval_every": 8, "log_every": 1,
                "router_aux_loss_weight": 0.02}
    path = small_recipe(tmp_path, model={"config": config, "tokenizer": "synthetic",
                                         "dtype": "float32"},
                        pretrain={"quantize": False, "training": training})
    recipe = load_recipe(path)
    run_pretrain(recipe)
    logged = [m for m in read_metrics(Path(recipe.stage_dir("pretrain")) / "metrics.jsonl")
              if "loss" in m]
    assert logged and all("loss_moe_aux" in m and "loss_expert_load" in m for m in logged)
    assert all(1.0 <= m["loss_expert_load"] <= 2.0 for m in logged)
    assert logged[-1]["loss"] < logged[0]["loss"]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_expert_sub_norm_gains_are_neither_decayed_nor_orthogonalised(optimizer):
    """An expert's SubLN weight is 2-D ([E, I]) but a gain like every norm's."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from wftool.model.families import FAMILIES
    from wftool.model.surgery import convert_to_bitnet
    from wftool.recipe.schema import TrainingSpec
    from wftool.train.optim import build_optimizers

    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2))
    convert_to_bitnet(model, FAMILIES["mixtral"], "paper")
    gain = model.model.layers[0].mlp.experts.ffn_sub_norm.weight
    assert gain.ndim == 2
    optimizers = build_optimizers(model, TrainingSpec(optimizer=optimizer, weight_decay=0.1))
    holders = [(type(opt).__name__, group["weight_decay"]) for opt in optimizers
               for group in opt.param_groups if any(p is gain for p in group["params"])]
    assert holders == [("AdamW", 0.0)]


def test_the_models_own_aux_loss_is_switched_off():
    """wft adds the balancing loss itself; transformers' own cannot read unified's 4-D masks."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from wftool.recipe.schema import TrainingSpec
    from wftool.train.moe_balance import router_balance

    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, output_router_logits=True))
    assert router_balance(model, TrainingSpec()).active
    assert model.config.output_router_logits is False
