"""The unified objective: the diffusion loss against a direct computation, its 1/t
weighting, the curriculum, the attention masks, and a tiny run that lowers both losses."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from wftool.recipe.schema import CurriculumPhase, UnifiedStage
from wftool.train.diffusion_masks import (
    block_context_mask,
    document_ids,
    maskable_positions,
    sample_noise,
    training_attention_mask,
)
from wftool.train.objectives import causal_lm_loss
from wftool.train.unified import (
    UnifiedObjective,
    block_predictions,
    anneal_lookahead,
    masked_diffusion_loss,
    phase_at,
)

VOCAB = 40
MASK = VOCAB - 1


def _direct_loss(logits, targets, masked, t, shift, maskable):
    """The estimator written out position by position."""
    total = 0.0
    for r in range(targets.shape[0]):
        for i in range(targets.shape[1]):
            if not masked[r, i]:
                continue
            source = logits[r, i - 1] if shift else logits[r, i]
            log_p = F.log_softmax(source.double(), -1)[targets[r, i]]
            total += -float(log_p) / float(t[r])
    return total / maskable


@pytest.mark.parametrize("shift", [True, False])
def test_diffusion_loss_equals_a_direct_computation_with_fixed_masks(shift):
    torch.manual_seed(0)
    logits = torch.randn(3, 7, VOCAB)
    targets = torch.randint(0, VOCAB - 1, (3, 7))
    masked = torch.rand(3, 7) < 0.5
    masked[:, 0] = False if shift else masked[:, 0]
    t = torch.tensor([0.2, 0.5, 0.9])
    loss = masked_diffusion_loss(logits, targets, masked, t, shift, maskable=17)
    assert float(loss) == pytest.approx(_direct_loss(logits, targets, masked, t, shift, 17),
                                        rel=1e-5)


def test_diffusion_loss_weights_each_row_by_one_over_t():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, VOCAB)
    targets = torch.randint(0, VOCAB, (2, 5))
    masked = torch.zeros(2, 5, dtype=torch.bool)
    masked[0, 2] = True  # one masked token in row 0 only
    base = masked_diffusion_loss(logits, targets, masked, torch.tensor([1.0, 1.0]), False, 10)
    halved = masked_diffusion_loss(logits, targets, masked, torch.tensor([0.5, 0.1]), False, 10)
    assert float(halved) == pytest.approx(2 * float(base), rel=1e-6)  # row 1's t is unused
    ce = -F.log_softmax(logits[0, 2], -1)[targets[0, 2]]
    assert float(base) == pytest.approx(float(ce) / 10, rel=1e-6)


def test_curriculum_phases_switch_at_their_step_fractions():
    phases = [CurriculumPhase(until=0.2, dlm_weight=0.0),
              CurriculumPhase(until=0.5, dlm_weight=0.5, mask_ratio=(0.1, 0.4)),
              CurriculumPhase(until=1.0, dlm_weight=1.0)]
    weights = [phase_at(phases, step, 10).dlm_weight for step in range(10)]
    assert weights == [0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert phase_at(phases, 3, 10).mask_ratio == (0.1, 0.4)


def test_curriculum_must_rise_to_one():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="end at 1.0"):
        UnifiedStage(curriculum=[{"until": 0.5, "dlm_weight": 1.0}])
    with pytest.raises(ValidationError, match="anneal_steps"):
        UnifiedStage(attention="anneal")
    with pytest.raises(ValidationError, match="past training.max_steps"):
        UnifiedStage(attention="anneal", anneal_steps=20, training={"max_steps": 10})


def test_anneal_grows_from_causal_to_bidirectional():
    assert anneal_lookahead(0, 10, 8) == 0
    assert anneal_lookahead(5, 10, 8) == 4
    assert anneal_lookahead(10, 10, 8) == 8
    positions = torch.arange(6)[None]
    causal = training_attention_mask(positions, "causal")
    assert torch.equal(training_attention_mask(positions, "anneal", lookahead=0), causal)
    assert training_attention_mask(positions, "anneal", lookahead=6).all()


def test_masks_keep_packed_documents_apart_in_every_mode():
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0]])  # three documents
    docs = document_ids(positions)[0]
    assert docs.tolist() == [1, 1, 1, 1, 2, 2, 2, 3]
    same = docs[:, None] == docs[None, :]
    for mode in ("causal", "bidirectional", "anneal", "block"):
        mask = training_attention_mask(positions, mode, block_size=2, lookahead=3)[0, 0]
        assert not (mask & ~same).any(), mode
        assert mask.diagonal().all()
    block = training_attention_mask(positions, "block", block_size=2)[0, 0]
    # Position 1 (block 0) sees position 0 and itself, not block 1 of its document.
    assert block[1, :4].tolist() == [True, True, False, False]
    assert block[2, :4].tolist() == [True, True, True, True]  # block 1 sees blocks 0 and 1


def test_padded_keys_are_hidden():
    positions = torch.tensor([[0, 1, 2, 0]])
    padding = torch.tensor([[1, 1, 1, 0]])
    mask = training_attention_mask(positions, "bidirectional", padding=padding)[0, 0]
    assert not mask[:3, 3].any() and mask[3, 3]


def test_maskable_positions_skip_document_starts_with_the_shift():
    labels = torch.tensor([[5, 6, 7, 8, -100]])
    positions = torch.tensor([[0, 1, 0, 1, 2]])
    assert maskable_positions(labels, positions, True).tolist() == [[False, True, False, True,
                                                                     False]]
    assert maskable_positions(labels, positions, False).tolist() == [[True, True, True, True,
                                                                      False]]


def test_noise_masks_about_t_of_the_eligible_tokens():
    eligible = torch.ones(400, 64, dtype=torch.bool)
    t, masked = sample_noise(eligible, 0.3, 0.3 + 1e-9, torch.Generator().manual_seed(0))
    assert t.min() >= 0.3 and t.max() <= 0.3 + 1e-6
    assert abs(masked.float().mean().item() - 0.3) < 0.01


def _tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64))


def _packed_batch(rows=4, seq=12):
    torch.manual_seed(3)
    ids = torch.randint(0, MASK, (rows, seq))
    positions = torch.cat([torch.arange(5), torch.arange(seq - 5)]).repeat(rows, 1)
    return {"input_ids": ids, "position_ids": positions, "labels": ids.clone()}


def _recording(model):
    """(a callable model that keeps its last inputs, those inputs)."""
    seen = {}

    def forward(**inputs):
        seen.update(inputs)
        return model(**inputs)

    return forward, seen


def _objective(step=9, max_steps=10, **spec):
    objective = UnifiedObjective(UnifiedStage(**spec), MASK, max_steps)
    objective.clock.before_step(step)
    return objective


def test_next_token_rows_match_the_pretrain_forward():
    """The explicit causal mask of next-token rows gives the logits transformers computes
    for packed rows from their position ids (what `pretrain` trains on)."""
    model = _tiny_model().eval()
    batch = _packed_batch()
    # No cache: transformers keeps packed documents apart only then (model_inputs does so).
    reference = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      use_cache=False).logits
    objective = _objective(step=0)  # dlm_weight 0: every row is a next-token row
    rows = objective._next_token_rows(batch, slice(None))
    logits = model(**rows).logits
    assert torch.allclose(logits, reference, atol=1e-5)
    loss, parts = objective(model, batch, 0.0)
    assert set(parts) == {"ar"}


def test_split_and_complementary_rows():
    model = _tiny_model()
    batch = _packed_batch(rows=4)
    recording, seen = _recording(model)

    loss, parts = _objective(mask_mode="split", attention="bidirectional")(recording, batch, 1.0)
    assert set(parts) == {"ar", "dlm"} and seen["input_ids"].shape[0] == 4
    noisy = seen["input_ids"][2:]
    assert (noisy == MASK).any() and torch.equal(noisy[noisy != MASK],
                                                 batch["input_ids"][2:][noisy != MASK])
    objective = _objective(mask_mode="complementary", attention="bidirectional")
    noise = objective._denoising_rows(batch, slice(2, 4), objective.spec.curriculum[-1], 9)
    first, second = noise["masked"][:2], noise["masked"][2:]
    eligible = maskable_positions(batch["labels"][2:], batch["position_ids"][2:], True)
    assert not (first & second).any() and torch.equal(first | second, eligible)
    assert torch.allclose(noise["t"][:2] + noise["t"][2:], torch.ones(2))
    objective(recording, batch, 1.0)
    assert seen["input_ids"].shape[0] == 6  # 2 next-token rows + 2 x 2 denoising rows
    # What batch sizing on a GPU assumes (wftool.train.gpu_profiles).
    assert objective.forward_rows_per_row == 6 / 4
    assert _objective(mask_mode="split", attention="anneal",
                      anneal_steps=5).forward_rows_per_row == 1.0
    assert _objective(attention="block").forward_rows_per_row == 4.0  # [clean | noisy]


def test_denoising_rows_of_one_document_ignore_the_others():
    model = _tiny_model().eval()
    batch = _packed_batch(rows=2)
    objective = _objective(attention="bidirectional")
    generator = torch.Generator().manual_seed(0)
    noise = objective._denoising_rows(batch, slice(None), objective.spec.curriculum[-1], 9,
                                      generator)
    logits = model(input_ids=noise["input_ids"], position_ids=noise["position_ids"],
                   attention_mask=noise["attention_mask"]).logits
    changed = noise["input_ids"].clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % MASK  # the second document only
    again = model(input_ids=changed, position_ids=noise["position_ids"],
                  attention_mask=noise["attention_mask"]).logits
    assert torch.allclose(logits[:, :5], again[:, :5], atol=1e-6)
    assert not torch.allclose(logits[:, 5:], again[:, 5:], atol=1e-3)


def test_unified_loss_is_finite_under_bf16_autocast():
    model = _tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = _objective()(model, _packed_batch(), 1.0)
    loss.backward()
    assert math.isfinite(loss.item()) and "dlm" in parts
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_block_rows_are_clean_causal_then_noisy_blocks_that_see_earlier_clean_blocks():
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])  # documents of 5 and 3 tokens
    mask = block_context_mask(positions, 1, 2)[0, 0]
    clean, noisy_to_clean, noisy = mask[:8, :8], mask[8:, :8], mask[8:, 8:]
    assert torch.equal(clean, training_attention_mask(positions, "causal")[0, 0])
    assert not mask[:8, 8:].any()  # the clean part never sees a noisy token
    # Position 3 (block 1 of document 1) sees clean block 0 of its document, nothing else.
    assert noisy_to_clean[3].tolist() == [True, True, False, False, False, False, False, False]
    assert noisy[3].tolist() == [False, False, True, True, False, False, False, False]
    assert noisy_to_clean[6].tolist() == [False] * 8  # block 0 of document 2
    assert noisy[7].tolist() == [False] * 5 + [False, False, True]  # its own block: 2


def test_block_training_sees_what_cached_block_decoding_sees():
    """The noisy block's logits in the [clean | noisy] row equal those of decoding: the
    earlier blocks prefilled causally into the KV cache, the block run against it."""
    from wftool.decoding.kv_cache import CachedSequence

    model = _tiny_model().eval()
    torch.manual_seed(5)
    ids = torch.randint(0, MASK, (1, 12))
    positions = torch.arange(12)[None]
    masked = torch.zeros(1, 12, dtype=torch.bool)
    masked[0, [8, 10, 11]] = True  # in block 2 of 4-token blocks
    noisy = torch.where(masked, torch.full_like(ids, MASK), ids)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([ids, noisy], 1), position_ids=positions.repeat(1, 2),
                       attention_mask=block_context_mask(positions, 1, 4),
                       use_cache=False).logits
        sequence = CachedSequence(model)
        before = sequence.prefill(ids[0, :8].tolist())
        decoded = sequence.forward(noisy[0, 8:].tolist(), attention="block", keep=False)
    assert torch.allclose(logits[0, 12 + 8:], decoded, atol=1e-4)
    assert torch.allclose(logits[0, 7], before, atol=1e-4)  # the clean part: causal logits
    spec = UnifiedStage(block_size=4)
    predicted, targets, hidden = block_predictions(logits[:, :12], logits[:, 12:], ids, masked,
                                                   positions, spec.block_size, True)
    # Position 8 starts block 2: the clean token before it predicts it, as in decoding.
    assert torch.equal(predicted[0, 7], logits[0, 7])
    assert torch.equal(predicted[0, 9], logits[0, 12 + 9])


def test_block_objective_takes_the_next_token_loss_from_the_clean_part():
    model = _tiny_model()
    batch = _packed_batch(rows=2)
    recording, seen = _recording(model)

    loss, parts = _objective(attention="block", block_size=4)(recording, batch, 1.0)
    assert seen["input_ids"].shape == (2, 24) and set(parts) == {"ar", "dlm"}
    assert torch.equal(seen["input_ids"][:, :12], batch["input_ids"])
    with torch.no_grad():
        clean = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      use_cache=False).logits
    assert abs(float(parts["ar"]) - float(causal_lm_loss(clean, batch["labels"]))) < 1e-5
    _objective(attention="block", mask_mode="complementary")(recording, batch, 1.0)
    assert seen["input_ids"].shape == (2, 36)  # [clean | M | not M]
