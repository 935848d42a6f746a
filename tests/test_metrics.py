"""Metric functions against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from kdpipe.pipeline import metrics


def test_topk_correct_by_hand() -> None:
    z = torch.tensor([[1.0, 3.0, 2.0], [5.0, 0.0, 1.0], [0.0, 1.0, 2.0]])
    y = torch.tensor([2, 0, 0])
    assert metrics.topk_correct(z, y, 1) == 1  # row 1 only
    assert metrics.topk_correct(z, y, 2) == 2  # row 0's label 2 is second
    assert metrics.topk_correct(z, y, 5) == 3  # k larger than the vocabulary: every row


def test_cross_entropy_and_perplexity_by_hand() -> None:
    z = torch.zeros(4, 2)  # uniform over two tokens: CE = ln 2 each, perplexity 2
    y = torch.tensor([0, 1, 0, 1])
    ce = metrics.cross_entropy_sum(z, y)
    assert ce == pytest.approx(4 * math.log(2))
    assert metrics.perplexity(ce, 4) == pytest.approx(2.0)
    # p(label) = e^2 / (e^2 + 1): CE = ln(1 + e^-2)
    assert metrics.cross_entropy_sum(torch.tensor([[2.0, 0.0]]), torch.tensor([0])) == pytest.approx(
        math.log(1 + math.exp(-2)))
    with pytest.raises(ValueError):
        metrics.perplexity(0.0, 0)
    assert metrics.perplexity(1e6, 1) == math.inf


def test_kl_and_agreement_by_hand() -> None:
    t = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    s = torch.tensor([[math.log(3.0), 0.0]])  # q = (3/4, 1/4)
    # KL(p||q) = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    assert metrics.kl_sum(t, s) == pytest.approx(0.5 * math.log(4 / 3))
    assert metrics.kl_sum(s, s) == pytest.approx(0.0, abs=1e-12)
    assert metrics.kl_sum(2 * t, 2 * s, temperature=2.0) == pytest.approx(metrics.kl_sum(t, s))
    # argmax: t row 0 -> 0 (tie, first), s row 0 -> 0; second row disagrees
    t2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s2 = torch.tensor([[2.0, 1.0], [1.0, 0.0]])
    assert metrics.agreement_count(t2, s2) == 1


def test_mlm_sums_batches_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "ROW_CHUNK", 4)  # chunked rows inside one batch, too
    g = torch.Generator().manual_seed(0)
    zt, zs = torch.randn(10, 7, generator=g), torch.randn(10, 7, generator=g)
    y = torch.randint(0, 7, (10,), generator=g)
    whole, parts = metrics.MlmSums(), metrics.MlmSums()
    whole.add(zs, y, zt)
    parts.add(zs[:3], y[:3], zt[:3])
    parts.add(zs[3:], y[3:], zt[3:])
    a, b = whole.result(), parts.result()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k])
    assert a["masked_tokens"] == 10
    assert a["top1_accuracy"] == pytest.approx(metrics.topk_correct(zs, y, 1) / 10)
    assert a["perplexity"] == pytest.approx(math.exp(torch.nn.functional.cross_entropy(zs, y).item()))
    teacher_only = metrics.MlmSums()
    teacher_only.add(zt, y)
    r = teacher_only.result()
    assert r["teacher_agreement"] is None and r["kl_teacher_student"] is None


def test_accuracy_and_macro_f1_by_hand() -> None:
    assert metrics.accuracy(list("abaa"), list("abba")) == 0.75
    gold, pred = list("aabbc"), list("abbba")
    # a: tp 1 fp 1 fn 1 -> 2/4; b: tp 2 fp 1 fn 0 -> 4/5; c: tp 0 fp 0 fn 1 -> 0
    assert metrics.macro_f1(pred, gold) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    # an explicitly listed class nobody used counts as F1 0
    assert metrics.macro_f1(pred, gold, labels=list("abcd")) == pytest.approx((0.5 + 0.8) / 4)
    assert metrics.macro_f1(list("ab"), list("ab")) == 1.0
    with pytest.raises(ValueError):
        metrics.accuracy([1], [1, 2])
    with pytest.raises(ValueError):
        metrics.accuracy([], [])


def test_median_spread_retention_speedup() -> None:
    s = metrics.median_spread([3, 1, 2])
    assert (s.median, s.min, s.max, s.values) == (2, 1, 3, [3.0, 1.0, 2.0])
    assert metrics.median_spread([4, 1, 2, 3]).median == 2.5
    assert metrics.median_spread([0.7]).median == 0.7
    with pytest.raises(ValueError):
        metrics.median_spread([])
    assert metrics.retention(77.0, 79.5) == pytest.approx(96.855, abs=1e-3)  # the paper's "97%"
    assert metrics.retention(0.5, 0.0) is None
    assert metrics.speedup(1.0, 1.6) == pytest.approx(1.6)
    assert metrics.speedup(0.0, 1.0) is None


def test_paired_delta_se_by_hand() -> None:
    gold = [1, 1, 1, 1]
    # correct: model 1,1,0,0; baseline 1,0,0,0 -> d = 0,1,0,0: mean 1/4, sample variance 1/4
    assert metrics.paired_delta_se([[1, 1, 0, 0]], [[1, 0, 0, 0]], gold) == pytest.approx(math.sqrt(0.25 / 4))
    # seeds are averaged per example first: model 0.5,0.5,0,0 against baseline 0,0,0,0
    se = metrics.paired_delta_se([[1, 0, 0, 0], [0, 1, 0, 0]], [[0, 0, 0, 0]], gold)
    d = [0.5, 0.5, 0.0, 0.0]
    assert se == pytest.approx(math.sqrt(sum((x - 0.25) ** 2 for x in d) / 3 / 4))
    assert metrics.paired_delta_se([[1, 0, 1, 0]], [[1, 0, 1, 0]], gold) == 0.0  # the same answers
    with pytest.raises(ValueError):
        metrics.paired_delta_se([[1, 0]], [[1, 0, 1, 0]], gold)
    with pytest.raises(ValueError):
        metrics.paired_delta_se([[1]], [[1]], [1])


def test_pairing_shrinks_the_error_of_two_models_that_share_their_mistakes() -> None:
    import random

    rng = random.Random(0)
    gold = [0] * 1000
    hard = [rng.random() < 0.3 for _ in gold]  # both models miss these; they differ on 2% of the rest
    a = [[1 if h else 0 for h in hard]]
    b = [[1 if h or rng.random() < 0.02 else 0 for h in hard]]
    paired = metrics.paired_delta_se(a, b, gold)
    p = 0.7
    assert paired < 0.5 * math.sqrt(2 * p * (1 - p) / len(gold))
