"""Each loss term against a plain float64 reference written from its formula."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdpipe.pipeline.layer_targets import with_layer_maps
from kdpipe.pipeline.losses import (
    LossSpec, cosine_loss, distillation_loss, layer_cosine_loss, mlm_loss, task_distill_loss, topk_kl,
)
from kdpipe.pipeline.schedule import lr_at, warmup_steps

torch.set_num_threads(1)


# ------------------------------------------------------------------ float64 references (numpy)

def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def ref_full_kl(teacher: np.ndarray, student: np.ndarray, t: float) -> float:
    """The reference's KLDivLoss(batchmean)(log_softmax(s/T), softmax(t/T)) * T^2, in float64."""
    p, q = softmax(teacher / t), softmax(student / t)
    return float((p * (np.log(p) - np.log(q))).sum(-1).mean() * t * t)


def ref_coarse_kl(teacher: np.ndarray, student: np.ndarray, t: float, k: int) -> float:
    """KL of (teacher top-k + tail bucket) vs (student at those ids + the rest), * T^2."""
    out = []
    for zt, zs in zip(teacher, student):
        ids = np.argsort(-zt, kind="stable")[:k]
        p, q = softmax(zt / t), softmax(zs / t)
        pk, qk = p[ids], q[ids]
        r, tail = 1.0 - pk.sum(), 1.0 - qk.sum()
        v = (pk * (np.log(pk) - np.log(qk))).sum()
        if k < len(zt):
            v += r * (np.log(r) - np.log(tail))
        out.append(v)
    return float(np.mean(out) * t * t)


def cache_view(teacher: np.ndarray, t: float, k: int) -> tuple[torch.Tensor, ...]:
    """What teacher-dump stores: top-k ids, their raw logits (fp16), log_z at T (fp32)."""
    z = torch.from_numpy(teacher)
    vals, ids = torch.topk(z, k, dim=-1)
    log_z = torch.logsumexp(z / t, dim=-1)
    return ids, vals.half().float(), log_z.float()


def fp16_exact(x: np.ndarray) -> np.ndarray:
    """Logits that fp16 stores exactly, so cached and full-logit losses see the same teacher."""
    return x.astype(np.float16).astype(np.float64)


@pytest.fixture
def logits() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    teacher = fp16_exact(rng.normal(0, 3, (12, 40)))
    student = rng.normal(0, 2, (12, 40))
    return teacher, student


# -------------------------------------------------------------------------------------- L_ce

@pytest.mark.parametrize("t", [1.0, 2.0, 4.0])
def test_ce_with_k_equal_vocab_is_the_full_kl(logits, t):
    teacher, student = logits
    ids, vals, log_z = cache_view(teacher, t, k=teacher.shape[1])
    got = topk_kl(torch.from_numpy(student).float(), ids, vals, log_z, t).mean().item() * t * t
    assert got == pytest.approx(ref_full_kl(teacher, student, t), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_ce_with_small_k_is_the_coarse_grained_kl_and_a_lower_bound(logits, t, k):
    teacher, student = logits
    ids, vals, log_z = cache_view(teacher, t, k)
    got = topk_kl(torch.from_numpy(student).float(), ids, vals, log_z, t).mean().item() * t * t
    assert got == pytest.approx(ref_coarse_kl(teacher, student, t, k), rel=1e-5, abs=1e-6)
    assert got <= ref_full_kl(teacher, student, t) + 1e-6


def test_tail_mass_is_the_teachers_own_not_zero():
    teacher = fp16_exact(np.linspace(1.0, 0.0, 10)[None, :])  # the top-2 hold ~25%, the tail ~75%
    student = np.zeros((1, 10))
    student[0, 0] = 5.0  # the student puts almost all its mass on a top token
    ids, vals, log_z = cache_view(teacher, 1.0, 2)
    got = topk_kl(torch.from_numpy(student).float(), ids, vals, log_z, 1.0).item()
    assert got == pytest.approx(ref_coarse_kl(teacher, student, 1.0, 2), rel=1e-6)
    p, q = softmax(teacher[0])[:2], softmax(student[0])[:2]
    top_only = float((p * (np.log(p) - np.log(q))).sum())  # what a tail assumed to be 0 would give
    assert got > top_only + 1.0


def test_tiny_student_tail_uses_the_exact_logsumexp():
    """A student with (almost) all its mass on the teacher's top-k: log1p(-sum q) would round to
    log(0); the exact path keeps the value and the gradient finite and right."""
    rng = np.random.default_rng(1)
    teacher = fp16_exact(rng.normal(0, 1, (4, 30)))
    student = rng.normal(0, 1, (4, 30))
    ids, vals, log_z = cache_view(teacher, 1.0, 3)
    student[np.arange(4)[:, None], ids.numpy()] += 25.0  # tail ~ 1e-10 of the mass
    s = torch.from_numpy(student).float().requires_grad_(True)
    got = topk_kl(s, ids, vals, log_z, 1.0)
    assert got.mean().item() == pytest.approx(ref_coarse_kl(teacher, student, 1.0, 3), rel=1e-4)
    got.mean().backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("k", [7, 40])
def test_ce_gradients_are_finite(logits, k):
    teacher, student = logits
    ids, vals, log_z = cache_view(teacher, 2.0, k)
    s = torch.from_numpy(student).float().requires_grad_(True)
    topk_kl(s, ids, vals, log_z, 2.0).mean().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 16), st.sampled_from([1.0, 2.0, 4.0]))
def test_coarse_kl_is_between_zero_and_the_full_kl(seed, k, t):
    rng = np.random.default_rng(seed)
    teacher = fp16_exact(rng.normal(0, 4, (3, 16)))
    student = rng.normal(0, 4, (3, 16))
    ids, vals, log_z = cache_view(teacher, t, k)
    got = topk_kl(torch.from_numpy(student).float(), ids, vals, log_z, t).double().numpy()
    full = np.array([ref_full_kl(teacher[i:i + 1], student[i:i + 1], t) / t / t for i in range(3)])
    assert (got >= -1e-5).all()
    assert (got <= full + 1e-4 * (1 + full)).all()


# ----------------------------------------------------------------------------- L_mlm and L_cos

def test_mlm_is_the_float64_cross_entropy():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 3, (9, 25))
    labels = rng.integers(0, 25, 9)
    ref = float(np.mean(logsumexp(z) - z[np.arange(9), labels]))
    got = mlm_loss(torch.from_numpy(z).float(), torch.from_numpy(labels)).item()
    assert got == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("alpha,t", [(0.5, 2.0), (0.9, 1.0), (1.0, 4.0)])
def test_task_distillation_is_the_float64_mix_of_cross_entropy_and_softened_kl(alpha, t):
    """Fine-tuning against a teacher: (1 - alpha) * CE + alpha * T^2 * KL(p_T || q_T), per batch."""
    rng = np.random.default_rng(4)
    s, z = rng.normal(0, 2, (13, 6)), rng.normal(0, 3, (13, 6))  # student, teacher class logits
    labels = rng.integers(0, 6, 13)
    ce = float(np.mean(logsumexp(s) - s[np.arange(13), labels]))
    ref = (1 - alpha) * ce + alpha * ref_full_kl(z, s, t)
    student = torch.from_numpy(s).float().requires_grad_()
    got = task_distill_loss(student.bfloat16(), torch.from_numpy(labels), torch.from_numpy(z).float(), alpha, t)
    assert got.dtype == torch.float32  # bf16 autocast's logits are scored in float32
    assert got.item() == pytest.approx(ref, rel=1e-2)  # the bf16 rounding of the logits
    got = task_distill_loss(student, torch.from_numpy(labels), torch.from_numpy(z).float(), alpha, t)
    assert got.item() == pytest.approx(ref, rel=1e-6)
    got.backward()  # d/ds: (1 - alpha)(q_1 - y) / B + alpha * T * (q_T - p_T) / B
    y = np.eye(6)[labels]
    grad = ((1 - alpha) * (softmax(s) - y) + alpha * t * (softmax(s / t) - softmax(z / t))) / 13
    np.testing.assert_allclose(student.grad.numpy(), grad, rtol=1e-4, atol=1e-7)
    # a student equal to its teacher has nothing left to learn from it but the labels
    same = task_distill_loss(torch.from_numpy(z).float(), torch.from_numpy(labels), torch.from_numpy(z).float(),
                             alpha, t).item()
    assert same == pytest.approx((1 - alpha) * float(np.mean(logsumexp(z) - z[np.arange(13), labels])), abs=1e-6)
    # transfer examples (label -100) carry the KL only: the CE is the labelled rows' mean
    part = labels.copy()
    part[5:] = -100
    ce5 = float(np.mean(logsumexp(s[:5]) - s[np.arange(5), labels[:5]]))
    got = task_distill_loss(torch.from_numpy(s).float(), torch.from_numpy(part), torch.from_numpy(z).float(), alpha, t)
    assert got.item() == pytest.approx((1 - alpha) * ce5 + alpha * ref_full_kl(z, s, t), rel=1e-6)
    none = torch.full((13,), -100)
    got = task_distill_loss(torch.from_numpy(s).float(), none, torch.from_numpy(z).float(), alpha, t)
    assert got.item() == pytest.approx(alpha * ref_full_kl(z, s, t), rel=1e-6)  # finite with no label


def test_cos_is_the_float64_mean_of_one_minus_cosine():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(11, 8)), rng.normal(size=(11, 8))
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    got = cosine_loss(torch.from_numpy(a).float(), torch.from_numpy(b).float()).item()
    assert got == pytest.approx(float(np.mean(1 - cos)), rel=1e-6)


# -------------------------------------------------------------- all three from one forward

class _Body(torch.nn.Module):
    """A stand-in student body: embedding lookup, outputs[0] is (B, T, H)."""

    def __init__(self, vocab: int, width: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)

    def forward(self, input_ids, attention_mask):
        return (self.emb(input_ids),)


def _batch(vocab=30, width=6, d=4, k=5, t=2.0):
    rng = np.random.default_rng(4)
    lengths = [5, 3]
    ids = torch.zeros(2, 5, dtype=torch.long)
    att = torch.zeros(2, 5, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.from_numpy(rng.integers(1, vocab, n))
        att[i, :n] = 1
    n = sum(lengths)
    teacher = fp16_exact(rng.normal(0, 3, (n, vocab)))
    tk_ids, tk_vals, log_z = cache_view(teacher, t, k)
    return SimpleNamespace(
        input_ids=ids, attention_mask=att, topk_ids=tk_ids, topk_logits=tk_vals, log_z=log_z,
        hidden=torch.from_numpy(rng.normal(size=(n, d))).float(),
        mlm_index=torch.tensor([1, 4, 6]), mlm_labels=torch.tensor([3, 7, 9]),
    ), teacher


@pytest.mark.parametrize("masked_only", [False, True])
def test_distillation_loss_combines_the_reference_terms(masked_only):
    torch.manual_seed(0)
    vocab, width, d, t = 30, 6, 4, 2.0
    body, head, hmap = _Body(vocab, width), torch.nn.Linear(width, vocab), torch.nn.Linear(width, d, bias=False)
    batch, teacher = _batch(vocab, width, d, k=5, t=t)
    spec = LossSpec(5.0, 2.0, 1.0, t, masked_only)
    terms = distillation_loss(body, head, hmap, batch, spec)

    with torch.no_grad():
        hv = body(batch.input_ids, batch.attention_mask)[0][batch.attention_mask.bool()].double()
        z = (hv @ head.weight.double().T + head.bias.double()).numpy()
        rows = batch.mlm_index.numpy() if masked_only else np.arange(len(z))
        ce = ref_coarse_kl(teacher[rows], z[rows], t, 5)
        zm = z[batch.mlm_index.numpy()]
        mlm = float(np.mean(logsumexp(zm) - zm[np.arange(3), batch.mlm_labels.numpy()]))
        s = (hv @ hmap.weight.double().T).numpy()
        h = batch.hidden.double().numpy()
        cos = float(np.mean(1 - (s * h).sum(-1) / np.linalg.norm(s, axis=-1) / np.linalg.norm(h, axis=-1)))
    assert terms.ce.item() == pytest.approx(ce, rel=1e-5)
    assert terms.mlm.item() == pytest.approx(mlm, rel=1e-5)
    assert terms.cos.item() == pytest.approx(cos, rel=1e-5)
    assert terms.loss.item() == pytest.approx(5 * ce + 2 * mlm + cos, rel=1e-5)
    terms.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in (*body.parameters(), *head.parameters()))


def test_zero_weight_terms_are_not_computed():
    torch.manual_seed(0)
    body, head, hmap = _Body(30, 6), torch.nn.Linear(6, 30), torch.nn.Linear(6, 4, bias=False)
    batch, _ = _batch()
    terms = distillation_loss(body, head, hmap, batch, LossSpec(0.0, 0.0, 1.0))
    assert terms.ce is None and terms.mlm is None and terms.loss.item() == pytest.approx(terms.cos.item())


# ------------------------------------------------------------------- L_layer (hidden_layers)

def ref_cos_loss(s: np.ndarray, h: np.ndarray) -> float:
    return float(np.mean(1 - (s * h).sum(-1) / np.linalg.norm(s, axis=-1) / np.linalg.norm(h, axis=-1)))


def test_layer_cos_is_the_float64_mean_over_layers_of_each_layers_cosine_loss():
    rng = np.random.default_rng(5)
    n, hs, d = 13, 6, 4
    states = [rng.normal(size=(n, hs)) for _ in range(2)]
    maps = [torch.nn.Linear(hs, d, bias=False) for _ in range(2)]
    teacher = rng.normal(size=(n, 3, d))  # three cached layers; the pairs use blocks 2 and 0
    got = layer_cosine_loss([torch.from_numpy(x).float() for x in states], maps,
                            torch.from_numpy(teacher).float(), [2, 0]).item()
    w = [m.weight.detach().double().numpy() for m in maps]
    want = np.mean([ref_cos_loss(states[0] @ w[0].T, teacher[:, 2]), ref_cos_loss(states[1] @ w[1].T, teacher[:, 0])])
    assert got == pytest.approx(float(want), rel=1e-6)


def _tiny_bert(layers: int = 3, width: int = 8, vocab: int = 30):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=2,
                                intermediate_size=16, max_position_embeddings=16)).eval()


@pytest.mark.parametrize("same_width", [True, False])
def test_distillation_loss_adds_layer_cos_through_each_layers_map(same_width):
    """A real 3-layer BERT body: pairs (1, block 1) and (2, block 0) of a 2-layer cached stack; the
    maps are the layers' fixed projections where the teacher is as wide, else learned ones."""
    vocab, width, d = 30, 8, 4
    body, head = _tiny_bert(3, width, vocab), torch.nn.Linear(width, vocab)
    batch, _ = _batch(vocab, width, d)
    rng = np.random.default_rng(6)
    batch.hidden_layers = torch.from_numpy(rng.normal(size=(batch.hidden.shape[0], 2, d))).float()
    teacher_width = width if same_width else 12
    projections = [torch.linalg.qr(torch.randn(teacher_width, d))[0] for _ in range(2)]
    hmap = with_layer_maps(torch.nn.Linear(width, d, bias=False), width, teacher_width, projections)
    spec = LossSpec(0.0, 2.0, 1.0, alpha_layer_cos=3.0, layer_pairs=((1, 1), (2, 0)))
    terms = distillation_loss(body, head, hmap, batch, spec)

    with torch.no_grad():
        out = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        valid = batch.attention_mask.bool()
        st = [out.hidden_states[m][valid].double().numpy() for m in (1, 2)]
        mats = [m.matrix.double().numpy() if same_width else m.weight.double().numpy().T for m in hmap.layers]
        t = batch.hidden_layers.double().numpy()
        layer = np.mean([ref_cos_loss(st[0] @ mats[0], t[:, 1]), ref_cos_loss(st[1] @ mats[1], t[:, 0])])
    if same_width:
        assert [torch.equal(m.matrix, p) for m, p in zip(hmap.layers, projections)] == [True, True]
    assert terms.layer_cos.item() == pytest.approx(float(layer), rel=1e-5)
    assert terms.loss.item() == pytest.approx(2 * terms.mlm.item() + terms.cos.item() + 3 * float(layer), rel=1e-5)
    terms.loss.backward()
    lower = [p for n, p in body.named_parameters() if "encoder.layer.0." in n]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lower)
    if not same_width:  # the learned layer maps are trained
        assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in hmap.layers)


def test_layer_cos_is_off_by_default():
    body, head = _tiny_bert(), torch.nn.Linear(8, 30)
    batch, _ = _batch(30, 8, 4)
    terms = distillation_loss(body, head, torch.nn.Linear(8, 4, bias=False), batch, LossSpec(0.0, 1.0, 1.0))
    assert LossSpec().alpha_layer_cos == 0 and terms.layer_cos is None


# ------------------------------------------------------------------------------------ schedule

def test_schedule_is_warmup_then_linear_decay():
    total, warm = 100, warmup_steps(100, 0.05)
    assert warm == 5
    lrs = [lr_at(s, 5e-4, total, warm) for s in range(total)]
    assert lrs[0] > 0 and lrs[4] == pytest.approx(5e-4) and lrs[5] == pytest.approx(5e-4)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and lrs[-1] > 0
    assert all(a <= b for a, b in zip(lrs[:5], lrs[1:6]))
