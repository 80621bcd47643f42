"""Each loss against a direct reference computation in float64."""

import math

import pytest
import torch

from wftool.train.objectives import (
    attention_relation_loss,
    causal_lm_loss,
    hidden_state_loss,
    layer_weights,
    logits_kl_loss,
)

gen = torch.Generator().manual_seed(0)


def _rand(*shape):
    return torch.randn(*shape, generator=gen)


def test_causal_lm_loss_matches_per_token_reference():
    logits, labels = _rand(2, 5, 7), torch.randint(0, 7, (2, 5), generator=gen)
    labels[0, 3] = -100
    terms = []
    for b in range(2):
        for t in range(4):
            target = labels[b, t + 1].item()
            if target == -100:
                continue
            log_probs = torch.log_softmax(logits[b, t].double(), -1)
            terms.append(-log_probs[target].item())
    assert causal_lm_loss(logits, labels).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)


def test_layer_weights():
    w = layer_weights(4, "linear")
    assert w.tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert layer_weights(3, "uniform").tolist() == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("normalize", ["l2", "rms"])
def test_hidden_state_loss_matches_reference(normalize):
    student = [_rand(2, 3, 8) for _ in range(3)]
    teacher = [_rand(2, 3, 8) for _ in range(3)]
    weights = layer_weights(3, "linear")
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    expected, count = 0.0, mask.sum().item()
    for w, hs, ht in zip(weights.tolist(), student, teacher):
        layer_total = 0.0
        for b in range(2):
            for t in range(3):
                if not mask[b, t]:
                    continue
                s, te = hs[b, t].double(), ht[b, t].double()
                if normalize == "l2":
                    s, te = s / s.norm(), te / te.norm()
                else:
                    s = s / torch.sqrt((s**2).mean() + 1e-6)
                    te = te / torch.sqrt((te**2).mean() + 1e-6)
                layer_total += ((s - te) ** 2).sum().item()
        expected += w * layer_total / count
    got = hidden_state_loss(student, teacher, weights, normalize, mask).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_hidden_state_loss_zero_for_identical_and_scale_invariant_l2():
    h = [_rand(2, 4, 8)]
    w = layer_weights(1, "linear")
    assert hidden_state_loss(h, [x.clone() for x in h], w).item() == pytest.approx(0.0, abs=1e-7)
    assert hidden_state_loss(h, [3 * x for x in h], w).item() == pytest.approx(0.0, abs=1e-6)


def test_logits_kl_matches_reference_with_temperature_and_mask():
    s, t = _rand(2, 3, 6), _rand(2, 3, 6)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    tau = 5.0
    terms = []
    for b in range(2):
        for i in range(3):
            if not mask[b, i]:
                continue
            p = torch.softmax(t[b, i].double() / tau, -1)
            q = torch.softmax(s[b, i].double() / tau, -1)
            terms.append((p * (p.log() - q.log())).sum().item())
    expected = tau**2 * sum(terms) / len(terms)
    assert logits_kl_loss(s, t, tau, mask).item() == pytest.approx(expected, rel=1e-5)
    assert logits_kl_loss(s, s.clone(), tau).item() == pytest.approx(0.0, abs=1e-7)


def _relation_reference(student, teacher, heads, mask):
    """Explicit loops: per matrix, head and valid query row."""
    total = 0.0
    for name in ("q", "k", "v"):
        s_all, t_all = student[name].double(), teacher[name].double()
        batch, seq, width = s_all.shape
        d = width // heads
        terms = []
        for b in range(batch):
            valid = [j for j in range(seq) if mask is None or mask[b, j]]
            for h in range(heads):
                s = s_all[b, valid, h * d:(h + 1) * d]
                t = t_all[b, valid, h * d:(h + 1) * d]
                s = s / s.norm(dim=-1, keepdim=True)
                t = t / t.norm(dim=-1, keepdim=True)
                ps = torch.softmax(s @ s.T, -1)
                pt = torch.softmax(t @ t.T, -1)
                for i in range(len(valid)):
                    terms.append((pt[i] * (pt[i].log() - ps[i].log())).sum().item())
        total += sum(terms) / len(terms)
    return total / heads


@pytest.mark.parametrize("masked", [False, True])
def test_attention_relation_loss_matches_reference(masked):
    heads = 4
    student = {k: _rand(2, 5, 16) for k in "qkv"}
    teacher = {k: _rand(2, 5, 8 if k != "q" else 16) * 2 for k in "qkv"}
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]) if masked else None
    # Relations are seq x seq, so student and teacher widths may differ (here K, V).
    student_kv = {"q": student["q"], "k": _rand(2, 5, 8), "v": _rand(2, 5, 8)}
    got = attention_relation_loss(student_kv, teacher, heads, mask).item()
    assert got == pytest.approx(_relation_reference(student_kv, teacher, heads, mask), rel=1e-5)


def test_relation_loss_is_zero_for_identical_inputs_and_positive_otherwise():
    qkv = {k: _rand(2, 6, 64) for k in "qkv"}
    same = {k: v.clone() for k, v in qkv.items()}
    assert attention_relation_loss(qkv, same, 32).item() == pytest.approx(0.0, abs=1e-7)
    # Per-token rescaling leaves cosine relations unchanged.
    scaled = {k: v * torch.rand(2, 6, 1, generator=gen).add(0.5) for k, v in qkv.items()}
    assert attention_relation_loss(qkv, scaled, 32).item() == pytest.approx(0.0, abs=1e-6)
    other = {k: _rand(2, 6, 64) for k in "qkv"}
    assert attention_relation_loss(qkv, other, 32).item() > 1e-3


def test_relation_width_must_split_into_heads():
    qkv = {k: _rand(1, 3, 10) for k in "qkv"}
    with pytest.raises(ValueError, match="not divisible"):
        attention_relation_loss(qkv, qkv, 32)


def test_losses_backpropagate_to_student_only():
    s = _rand(2, 3, 6).requires_grad_()
    t = _rand(2, 3, 6)
    logits_kl_loss(s, t, 2.0).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert not math.isnan(s.grad.abs().sum().item())
