"""MLM masking as in the DistilBERT reference, drawn once and stored with the cache.

Each draw is a pure function of (seed, sequence id, view): any shard can be recomputed alone and
identically, and `--mask-views N` gives N independent draws of one sequence.
`mask_sequences` draws a whole shard's rows at once: the per-token work (which tokens may be
chosen, their weights, the replacements) is done over the shard's flat arrays, and each row keeps
its own generator, called exactly as `mask_sequence` calls it, so the rows are the same bits.
Reference rules: 15% of the maskable tokens are chosen (special tokens never are), optionally
with probability proportional to count**-smoothing (0.7 in the reference); of those, 80% become
[MASK], 10% a random token and 10% stay unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MaskingSpec:
    mask_prob: float = 0.15
    mask_token_prob: float = 0.8
    random_token_prob: float = 0.1
    smoothing: float = 0.0  # 0: uniform choice of positions; the reference uses 0.7
    seed: int = 0


@dataclass(frozen=True)
class Vocabulary:
    """What masking needs to know about the tokenizer."""

    size: int
    mask_id: int
    special_ids: np.ndarray  # (n_special,) int64: never masked, never drawn as random tokens

    def random_pool(self) -> np.ndarray:
        """Token ids a position may be replaced with: every non-special id."""
        keep = np.ones(self.size, dtype=bool)
        keep[self.special_ids] = False
        return np.flatnonzero(keep).astype(np.int64)


@dataclass(frozen=True)
class MaskedSequence:
    input_ids: np.ndarray  # (T,) what the teacher sees
    positions: np.ndarray  # (M,) sorted masked positions
    labels: np.ndarray  # (M,) original ids at those positions


def token_weights(counts: np.ndarray, smoothing: float, special_ids: np.ndarray) -> np.ndarray:
    """Per-token choice weight count**-smoothing (counts clipped at 1), zero for special tokens."""
    w = np.maximum(counts.astype(np.float64), 1.0) ** (-smoothing)
    w[special_ids] = 0.0
    return w


def rng_for(seed: int, seq_id: int, view: int, stream: int = 0) -> np.random.Generator:
    """The generator of one (seed, sequence, view) triple; `stream` separates independent uses."""
    return np.random.default_rng(np.random.SeedSequence([seed, seq_id, view, stream]))


def mask_sequence(
    ids: np.ndarray,
    seq_id: int,
    view: int,
    spec: MaskingSpec,
    vocab: Vocabulary,
    pool: np.ndarray,
    weights: np.ndarray | None = None,
) -> MaskedSequence:
    """Mask one sequence; `pool` is `vocab.random_pool()`, `weights` from `token_weights`."""
    rng = rng_for(spec.seed, seq_id, view)
    maskable = ~np.isin(ids, vocab.special_ids)
    if weights is not None:
        w = weights[ids] * maskable
    else:
        w = maskable.astype(np.float64)
    candidates = np.flatnonzero(w > 0)
    n_mask = _n_mask(spec.mask_prob, len(candidates))
    out = ids.copy()
    if n_mask == 0:
        empty = np.zeros(0, dtype=ids.dtype)
        return MaskedSequence(out, empty.astype(np.int64), empty)
    p = w[candidates] / w[candidates].sum()
    positions = np.sort(rng.choice(candidates, size=n_mask, replace=False, p=p))
    u = rng.random(n_mask)
    to_mask = u < spec.mask_token_prob
    to_random = (u >= spec.mask_token_prob) & (u < spec.mask_token_prob + spec.random_token_prob)
    out[positions[to_mask]] = vocab.mask_id
    out[positions[to_random]] = pool[rng.integers(0, len(pool), size=int(to_random.sum()))]
    return MaskedSequence(out, positions.astype(np.int64), ids[positions])


def _n_mask(mask_prob: float, candidates: int) -> int:
    # round off float noise first: 0.14 * 50 is 7.000000000000001, and means 7 positions, not 8
    return min(candidates, math.ceil(round(mask_prob * candidates, 9)))


def mask_sequences(seqs: Sequence[np.ndarray], first_id: int, views: int, spec: MaskingSpec, vocab: Vocabulary,
                   pool: np.ndarray, weights: np.ndarray | None = None) -> list[MaskedSequence]:
    """`mask_sequence` of every (sequence first_id + j, view v), in (j, v) order, bit for bit."""
    if not seqs:
        return []
    lengths = np.array([len(x) for x in seqs], dtype=np.int64)
    ids = np.concatenate(seqs)  # (sum T,)
    special = np.zeros(max(vocab.size, int(ids.max()) + 1), dtype=bool)
    special[vocab.special_ids] = True
    w = (weights[ids] * ~special[ids]) if weights is not None else (~special[ids]).astype(np.float64)
    starts = np.concatenate([[0], np.cumsum(lengths)])  # (S + 1,)
    cand = np.flatnonzero(w > 0)  # (C,) flat positions that may be chosen, row by row
    cand_starts = np.searchsorted(cand, starts)  # (S + 1,)
    n_mask_of: dict[int, int] = {}
    keep_p = spec.mask_token_prob
    rand_hi = spec.mask_token_prob + spec.random_token_prob
    out: list[MaskedSequence] = []
    for j in range(len(seqs)):
        lo, hi = starts[j], starts[j + 1]
        c = cand[cand_starts[j]:cand_starts[j + 1]] - lo  # (C_j,) positions in the row
        if (n_mask := n_mask_of.get(len(c))) is None:
            n_mask = n_mask_of[len(c)] = _n_mask(spec.mask_prob, len(c))
        seq = ids[lo:hi]
        wc = w[lo:hi][c]
        for v in range(views):
            if n_mask == 0:
                empty = np.zeros(0, dtype=seq.dtype)
                out.append(MaskedSequence(seq.copy(), empty.astype(np.int64), empty))
                continue
            rng = rng_for(spec.seed, first_id + j, v)
            positions = np.sort(rng.choice(c, size=n_mask, replace=False, p=wc / wc.sum()))
            u = rng.random(n_mask)
            masked = seq.copy()
            to_random = (u >= keep_p) & (u < rand_hi)
            masked[positions[u < keep_p]] = vocab.mask_id
            masked[positions[to_random]] = pool[rng.integers(0, len(pool), size=int(to_random.sum()))]
            out.append(MaskedSequence(masked, positions.astype(np.int64), seq[positions]))
    return out
