"""Masking: the reference's 15% / 80-10-10 rules, specials untouched, and every draw a pure
function of (seed, sequence id, view)."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kdpipe.pipeline.masking import MaskingSpec, Vocabulary, mask_sequence, token_weights

V = 1000
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
VOCAB = Vocabulary(V, MASK, np.array([PAD, UNK, CLS, SEP, MASK], dtype=np.int64))
POOL = VOCAB.random_pool()
SPECIAL = set(VOCAB.special_ids.tolist())


def expected_count(mask_prob: float, maskable: int) -> int:
    """ceil(p * n) in exact decimal arithmetic: what a user who wrote --mask-prob p means."""
    return math.ceil(Fraction(Decimal(repr(mask_prob))) * maskable)


def packed_sequences(n: int, length: int = 128, seed: int = 0) -> list[np.ndarray]:
    """[CLS] words [SEP] words [SEP]: like packed corpus sequences, with a [SEP] inside."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        body = rng.integers(5, V, size=length - 2)
        body[rng.integers(0, length - 2)] = SEP  # a document boundary
        out.append(np.concatenate([[CLS], body, [SEP]]).astype(np.int64))
    return out


def check_invariants(ids: np.ndarray, m, spec: MaskingSpec) -> None:
    maskable = int((~np.isin(ids, VOCAB.special_ids)).sum())
    assert m.positions.dtype == np.int64 and m.labels.shape == m.positions.shape
    assert np.all(np.diff(m.positions) > 0), "positions must be sorted and unique"
    assert len(m.positions) == expected_count(spec.mask_prob, maskable)
    assert not np.isin(ids[m.positions], VOCAB.special_ids).any(), "a special token was chosen"
    np.testing.assert_array_equal(m.labels, ids[m.positions])
    untouched = np.ones(len(ids), dtype=bool)
    untouched[m.positions] = False
    np.testing.assert_array_equal(m.input_ids[untouched], ids[untouched])
    at = m.input_ids[m.positions]
    replaced = (at != MASK) & (at != ids[m.positions])
    assert not np.isin(at[replaced], VOCAB.special_ids).any(), "a random token was special"
    assert len(m.input_ids) == len(ids)


def test_random_pool_is_every_non_special_id() -> None:
    assert set(POOL.tolist()) == set(range(V)) - SPECIAL


def test_ratios_over_many_sequences() -> None:
    spec = MaskingSpec(seed=7)
    n_sel = n_mask = n_random = n_same = n_maskable = 0
    for i, ids in enumerate(packed_sequences(1500)):
        m = mask_sequence(ids, i, 0, spec, VOCAB, POOL)
        check_invariants(ids, m, spec)
        at = m.input_ids[m.positions]
        n_sel += len(m.positions)
        n_maskable += int((~np.isin(ids, VOCAB.special_ids)).sum())
        n_mask += int((at == MASK).sum())
        n_same += int((at == m.labels).sum())
        n_random += int(((at != MASK) & (at != m.labels)).sum())
    assert n_sel > 25_000
    assert abs(n_sel / n_maskable - 0.15) < 0.01
    assert abs(n_mask / n_sel - 0.8) < 0.01
    # a random draw equals the original with probability 1/|pool|: negligible here
    assert abs(n_random / n_sel - 0.1) < 0.01
    assert abs(n_same / n_sel - 0.1) < 0.01


def test_random_tokens_never_special() -> None:
    """All chosen positions get a random token: none of ~5k draws is a special id ([MASK] too)."""
    spec = MaskingSpec(mask_token_prob=0.0, random_token_prob=1.0, seed=3)
    for i, ids in enumerate(packed_sequences(300, seed=1)):
        m = mask_sequence(ids, i, 0, spec, VOCAB, POOL)
        assert not np.isin(m.input_ids[m.positions], VOCAB.special_ids).any()
        assert not np.isin(m.input_ids, [MASK]).any()


def test_only_specials_masks_nothing() -> None:
    ids = np.array([CLS, SEP, SEP, UNK, SEP], dtype=np.int64)
    m = mask_sequence(ids, 0, 0, MaskingSpec(), VOCAB, POOL)
    assert len(m.positions) == 0 and len(m.labels) == 0
    np.testing.assert_array_equal(m.input_ids, ids)


def test_real_tokenizer_specials_never_masked(tokenizer) -> None:
    """With the tiny teacher's tokenizer: [CLS]/[SEP]/[PAD]/[UNK]/[MASK] never chosen or drawn."""
    special = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    vocab = Vocabulary(len(tokenizer), tokenizer.mask_token_id, special)
    pool = vocab.random_pool()
    assert set(special.tolist()) >= {tokenizer.cls_token_id, tokenizer.sep_token_id,
                                     tokenizer.pad_token_id, tokenizer.mask_token_id}
    assert not np.isin(pool, special).any()
    text = "the king of the north and the river city . " * 6
    ids = np.array(tokenizer(text)["input_ids"], dtype=np.int64)
    spec = MaskingSpec(mask_token_prob=0.5, random_token_prob=0.5)
    for view in range(50):
        m = mask_sequence(ids, 0, view, spec, vocab, pool)
        assert not np.isin(ids[m.positions], special).any()
        at = m.input_ids[m.positions]
        assert not np.isin(at[at != vocab.mask_id], special).any()


# ----------------------------------------------------------------------------- determinism

def test_same_triple_same_draw_whatever_else_ran() -> None:
    ids = packed_sequences(1)[0]
    spec = MaskingSpec(seed=11)
    a = mask_sequence(ids, 42, 1, spec, VOCAB, POOL)
    for other in range(5):  # unrelated draws in between change nothing: no shared RNG state
        mask_sequence(ids, other, 0, spec, VOCAB, POOL)
    b = mask_sequence(ids.copy(), 42, 1, spec, VOCAB, POOL)
    for f in ("input_ids", "positions", "labels"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


@pytest.mark.parametrize("change", ["view", "seq_id", "seed"])
def test_other_view_sequence_or_seed_gives_another_draw(change: str) -> None:
    ids = packed_sequences(1)[0]
    base = dict(seq_id=5, view=0, seed=0)
    other = {**base, change: base[change] + 1}
    draws = [mask_sequence(ids, d["seq_id"], d["view"], MaskingSpec(seed=d["seed"]), VOCAB, POOL)
             for d in (base, other)]
    assert not np.array_equal(draws[0].positions, draws[1].positions)


def test_views_are_independent() -> None:
    """Over many views of one sequence, every maskable position is chosen about 15% of the time."""
    ids = packed_sequences(1, length=64)[0]
    hits = np.zeros(len(ids))
    views = 2000
    for v in range(views):
        hits[mask_sequence(ids, 0, v, MaskingSpec(), VOCAB, POOL).positions] += 1
    maskable = ~np.isin(ids, VOCAB.special_ids)
    assert hits[~maskable].sum() == 0
    rate = hits[maskable] / views  # each ~ 0.15 +- 0.008 (1 sd)
    assert np.all(np.abs(rate - rate.mean()) < 0.05)


# ------------------------------------------------------------------------------- smoothing

def test_token_weights() -> None:
    counts = np.zeros(V, dtype=np.int64)
    counts[10], counts[11] = 10_000, 1  # 12..: never seen, clipped to 1
    w = token_weights(counts, 0.7, VOCAB.special_ids)
    assert np.all(w[VOCAB.special_ids] == 0)
    assert w[10] == pytest.approx(10_000 ** -0.7)
    assert w[11] == 1.0 and w[12] == 1.0


@pytest.mark.parametrize("smoothing", [0.0, 0.3, 0.7])
def test_smoothing_favours_rare_tokens(smoothing: float) -> None:
    frequent, rare = 10, 11
    counts = np.ones(V, dtype=np.int64)
    counts[frequent] = 10_000
    weights = token_weights(counts, smoothing, VOCAB.special_ids)
    ids = np.array([CLS] + [frequent, rare] * 40 + [SEP], dtype=np.int64)
    chosen = {frequent: 0, rare: 0}
    for i in range(400):
        m = mask_sequence(ids, i, 0, MaskingSpec(smoothing=smoothing), VOCAB, POOL, weights)
        for t in chosen:
            chosen[t] += int((m.labels == t).sum())
    rate_frequent, rate_rare = chosen[frequent] / (400 * 40), chosen[rare] / (400 * 40)
    assert rate_frequent + rate_rare == pytest.approx(2 * 0.15, abs=1e-9)  # 12 of 80 per sequence
    if smoothing == 0:
        assert abs(rate_rare - rate_frequent) < 0.02
    else:
        # weight ratio 10000**s (16 at s=0.3, 631 at s=0.7): rare tokens win most picks
        assert rate_rare > 2 * rate_frequent
    if smoothing == 0.7:
        assert rate_frequent < 0.01


def test_more_smoothing_more_rare_picks() -> None:
    counts = np.ones(V, dtype=np.int64)
    counts[5:500] = 50  # the lower half of the vocabulary is frequent
    ids = packed_sequences(200, seed=4)
    share = []
    for s in (0.0, 0.35, 0.7):
        w = token_weights(counts, s, VOCAB.special_ids)
        labels = np.concatenate([mask_sequence(x, i, 0, MaskingSpec(smoothing=s), VOCAB, POOL, w).labels
                                 for i, x in enumerate(ids)])
        share.append(float((labels >= 500).mean()))
    assert share[0] < share[1] < share[2]
    assert share[0] == pytest.approx(0.5, abs=0.03)


# ------------------------------------------------------------------------------ hypothesis

token = st.integers(min_value=0, max_value=V - 1)


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(token, min_size=1, max_size=300), seq_id=st.integers(0, 2**40),
       view=st.integers(0, 1023), seed=st.integers(0, 2**31))
def test_any_sequence(ids: list[int], seq_id: int, view: int, seed: int) -> None:
    arr = np.array(ids, dtype=np.int64)
    spec = MaskingSpec(seed=seed)
    m = mask_sequence(arr, seq_id, view, spec, VOCAB, POOL)
    check_invariants(arr, m, spec)
    again = mask_sequence(arr, seq_id, view, spec, VOCAB, POOL)
    np.testing.assert_array_equal(m.input_ids, again.input_ids)


@settings(max_examples=300, deadline=None)
@example(maskable=50, hundredths=14, smoothing=0.0, seed=0)  # rare in the space: pinned
@example(maskable=100, hundredths=7, smoothing=0.7, seed=0)
@example(maskable=25, hundredths=28, smoothing=0.0, seed=0)
@given(maskable=st.integers(1, 400), hundredths=st.integers(1, 99),
       smoothing=st.sampled_from([0.0, 0.7]), seed=st.integers(0, 1000))
def test_count_is_ceil_of_the_share(maskable: int, hundredths: int, smoothing: float, seed: int) -> None:
    """For any --mask-prob with two decimals, the count is ceil(p * maskable) in exact arithmetic
    (0.14 * 50 is 7.000000000000001 in floating point: 7 positions, not 8)."""
    p = hundredths / 100
    arr = np.concatenate([[CLS], 5 + np.arange(maskable) % (V - 5), [SEP]]).astype(np.int64)
    counts = np.random.default_rng(seed).integers(0, 100, size=V)
    w = token_weights(counts, smoothing, VOCAB.special_ids) if smoothing else None
    spec = MaskingSpec(mask_prob=p, seed=seed, smoothing=smoothing)
    m = mask_sequence(arr, 0, 0, spec, VOCAB, POOL, w)
    check_invariants(arr, m, spec)


@pytest.mark.parametrize("smoothing, mask_prob, views", [(0.0, 0.15, 1), (0.7, 0.14, 3), (0.0, 0.5, 2)])
def test_a_shard_at_once_is_every_row_bit_for_bit(smoothing: float, mask_prob: float, views: int) -> None:
    """`mask_sequences` (what the dump calls) gives each row exactly what `mask_sequence` gives
    it alone: the cache's bytes do not depend on how many rows are masked together."""
    from kdpipe.pipeline.masking import mask_sequences

    rng = np.random.default_rng(7)
    seqs = packed_sequences(20, length=40, seed=2) + [
        np.array([2, 3], dtype=np.int64),  # nothing maskable
        np.array([2, 9, 3], dtype=np.int64),  # one maskable token
        rng.integers(5, V, size=7).astype(np.int64),
    ]
    counts = rng.integers(0, 50, size=V)
    weights = token_weights(counts, smoothing, VOCAB.special_ids) if smoothing else None
    spec = MaskingSpec(mask_prob=mask_prob, smoothing=smoothing, seed=11)
    got = mask_sequences(seqs, 1000, views, spec, VOCAB, POOL, weights)
    assert len(got) == len(seqs) * views
    for j, seq in enumerate(seqs):
        for v in range(views):
            one = mask_sequence(seq, 1000 + j, v, spec, VOCAB, POOL, weights)
            m = got[j * views + v]
            for name in ("input_ids", "positions", "labels"):
                a, b = getattr(m, name), getattr(one, name)
                assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (j, v, name)


@pytest.mark.parametrize("n_chosen", [1, 2])
def test_weighted_choice_is_sequential_choice_in_proportion_to_weight(n_chosen: int) -> None:
    """Each position is chosen as often as drawing positions one at a time, each in proportion to
    its weight among those left, would choose it (over 6000 views of one 3-token sequence)."""
    w = np.zeros(V)
    w[[10, 11, 12]] = [1.0, 2.0, 7.0]
    ids = np.array([CLS, 10, 11, 12, SEP], dtype=np.int64)
    spec = MaskingSpec(mask_prob=0.2 if n_chosen == 1 else 0.5, seed=5)
    views = 6000
    hits = np.zeros(3)
    from kdpipe.pipeline.masking import mask_sequences

    for m in mask_sequences([ids], 0, views, spec, VOCAB, POOL, w):
        assert len(m.positions) == n_chosen
        hits[m.positions - 1] += 1
    p = w[[10, 11, 12]] / w.sum()
    if n_chosen == 2:  # left out: the one not drawn in two draws
        left = [sum(p[j] * p[k] / (1 - p[j]) for j in range(3) for k in range(3) if len({i, j, k}) == 3)
                for i in range(3)]
        p = 1 - np.array(left)
    assert np.allclose(hits / views, p, atol=0.02), (hits / views, p)
