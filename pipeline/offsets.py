"""Ragged rows over flat arrays: row starts from counts, and the flat indices of chosen row spans.

The dump masks, the shards encode and the loader gathers whole shards at once over flat arrays
and offsets (no Python loop per token); these two functions are what they share.
"""

from __future__ import annotations

import numpy as np


def starts(counts: np.ndarray) -> np.ndarray:
    """(R + 1,) int64 offsets of rows holding counts[r] entries each: [0, c0, c0 + c1, ...]."""
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def ranges(begins: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(b, b + c) for each (b, c), without a Python loop per element."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    return np.repeat(begins - starts(counts)[:-1], counts) + np.arange(total, dtype=np.int64)
