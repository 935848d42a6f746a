"""Token sequences -> one right-padded batch: the padder of the dump, the fidelity report, the MLM
evaluation and fine-tuning alike."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pad(seqs: Sequence[np.ndarray | Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) int64 input ids padded with pad_id on the right, and the (B, T) attention mask.
    Built at once from the joined sequences (no copy per row: a dump pads every batch)."""
    rows = [np.asarray(x, dtype=np.int64).reshape(-1) for x in seqs]
    length = np.array([len(x) for x in rows], dtype=np.int64)  # (B,)
    width = int(length.max())
    att = np.arange(width)[None, :] < length[:, None]  # (B, T)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)  # (B, T)
    ids[att] = np.concatenate(rows)
    return torch.from_numpy(ids), torch.from_numpy(att.astype(np.int64))
