"""MLM masking as in the DistilBERT reference, drawn once and stored with the cache.

Each draw is a pure function of (seed, sequence id, view): any shard can be recomputed alone and
identically, and `--mask-views N` gives N independent draws of one sequence. There is no
generator state at all: every random number is a hash (splitmix64's mixer, chained) of (seed,
sequence id, view, position, use), so a whole shard's rows are masked at once over flat arrays,
with no per-row work in Python; `mask_sequence` masks one row the same way, to the same bits.
Reference rules: 15% of the maskable tokens are chosen (special tokens never are), optionally
with probability proportional to count**-smoothing (0.7 in the reference); of those, 80% become
[MASK], 10% a random token and 10% stay unchanged. Weighted choice without replacement is
Efraimidis and Spirakis's: the n positions with the smallest -log(u) / weight, which draws the
same sets with the same probabilities as choosing one position at a time in proportion to its
weight among those left.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from kdpipe.pipeline.offsets import ranges, starts

DRAWS = "splitmix64-v1"  # how the random numbers are made: in the fingerprint, since masks depend on it
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_CHOOSE, _ACTION, _TOKEN = 0, 1, 2  # the uses of a position's random numbers


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


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (multiplication wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _row_keys(seed: int, seq_ids: np.ndarray, views: np.ndarray) -> np.ndarray:
    """(R,) uint64: one key per (seed, sequence, view), each part mixed in turn."""
    k = _mix(np.full(len(seq_ids), seed, dtype=np.uint64) + _GOLDEN)
    k = _mix(k ^ (seq_ids.astype(np.uint64) + _GOLDEN))
    return _mix(k ^ (views.astype(np.uint64) + _GOLDEN))


def _uniforms(keys: np.ndarray, positions: np.ndarray, use: int) -> np.ndarray:
    """Uniforms in (0, 1], one per (row key, position), for one use: 53 bits of the hash."""
    h = _mix(keys ^ _mix(positions.astype(np.uint64) * np.uint64(4) + np.uint64(use) + _GOLDEN))
    return ((h >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53


def _n_mask(mask_prob: float, candidates: int) -> int:
    # round off float noise first: 0.14 * 50 is 7.000000000000001, and means 7 positions, not 8
    return min(candidates, math.ceil(round(mask_prob * candidates, 9)))


def _mask_rows(seqs: Sequence[np.ndarray], seq_of_row: np.ndarray, seq_ids: np.ndarray, views: np.ndarray,
               spec: MaskingSpec, vocab: Vocabulary, pool: np.ndarray, weights: np.ndarray | None
               ) -> list[MaskedSequence]:
    """Row r masks sequence seqs[seq_of_row[r]] as (seq_ids[r], views[r]), all rows at once."""
    ids = np.concatenate(seqs)  # (sum T,)
    seq_start = starts(np.array([len(x) for x in seqs], dtype=np.int64))  # (S + 1,)
    rlen = seq_start[seq_of_row + 1] - seq_start[seq_of_row]  # (R,)
    rows = len(rlen)
    tok = ranges(seq_start[seq_of_row], rlen)  # (N,) every row's tokens, as indices into ids
    row_of = np.repeat(np.arange(rows), rlen)  # (N,)
    pos = np.arange(len(tok), dtype=np.int64) - np.repeat(starts(rlen)[:-1], rlen)  # (N,) position in its row
    special = np.zeros(max(vocab.size, int(ids.max(initial=0)) + 1), dtype=bool)
    special[vocab.special_ids] = True
    w = np.where(special[ids[tok]], 0.0, 1.0 if weights is None else weights[ids[tok]])  # (N,)
    cand = np.flatnonzero(w > 0)  # (C,) in row order
    n_cand = np.bincount(row_of[cand], minlength=rows)  # (R,)
    cache: dict[int, int] = {}
    n_mask = np.array([cache.setdefault(int(c), _n_mask(spec.mask_prob, int(c))) for c in n_cand], dtype=np.int64)
    keys = _row_keys(spec.seed, seq_ids, views)  # (R,)
    # within each row, candidates by -log(u) / w ascending; the first n_mask of them are chosen
    e = -np.log(_uniforms(keys[row_of[cand]], pos[cand], _CHOOSE)) / w[cand]  # (C,)
    by_key = np.argsort(e)
    by_row = by_key[np.argsort(row_of[cand][by_key].astype(np.uint16 if rows <= 1 << 16 else np.int64), kind="stable")]
    chosen = cand[by_row[ranges(starts(n_cand)[:-1], n_mask)]]  # (M,) grouped by row
    chosen = chosen[np.argsort(chosen)]  # ascending: by row, then by position
    crow = row_of[chosen]
    u = _uniforms(keys[crow], pos[chosen], _ACTION)  # (M,)
    out = ids[tok]  # (N,)
    labels = out[chosen]
    out[chosen[u < spec.mask_token_prob]] = vocab.mask_id
    rand = chosen[(u >= spec.mask_token_prob) & (u < spec.mask_token_prob + spec.random_token_prob)]
    pick = (_uniforms(keys[row_of[rand]], pos[rand], _TOKEN) * len(pool)).astype(np.int64)
    out[rand] = pool[np.minimum(pick, len(pool) - 1)]
    toff, moff = starts(rlen), starts(n_mask)
    cpos = pos[chosen]
    return [MaskedSequence(out[toff[r]:toff[r + 1]], cpos[moff[r]:moff[r + 1]], labels[moff[r]:moff[r + 1]])
            for r in range(rows)]


def mask_sequence(ids: np.ndarray, seq_id: int, view: int, spec: MaskingSpec, vocab: Vocabulary,
                  pool: np.ndarray, weights: np.ndarray | None = None) -> MaskedSequence:
    """Mask one sequence; `pool` is `vocab.random_pool()`, `weights` from `token_weights`."""
    return _mask_rows([ids], np.zeros(1, dtype=np.int64), np.array([seq_id]), np.array([view]),
                      spec, vocab, pool, weights)[0]


def mask_sequences(seqs: Sequence[np.ndarray], first_id: int, views: int, spec: MaskingSpec, vocab: Vocabulary,
                   pool: np.ndarray, weights: np.ndarray | None = None) -> list[MaskedSequence]:
    """`mask_sequence` of every (sequence first_id + j, view v), in (j, v) order, bit for bit."""
    if not seqs:
        return []
    seq_of_row = np.repeat(np.arange(len(seqs), dtype=np.int64), views)
    return _mask_rows(seqs, seq_of_row, first_id + seq_of_row, np.tile(np.arange(views), len(seqs)),
                      spec, vocab, pool, weights)
