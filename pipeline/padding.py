"""Token sequences -> one right-padded batch: the padder of the dump, the fidelity report, the MLM
evaluation and fine-tuning alike."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pad(seqs: Sequence[np.ndarray | Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) int64 input ids padded with pad_id on the right, and the (B, T) attention mask."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    att = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for i, x in enumerate(seqs):
        ids[i, : len(x)] = torch.from_numpy(np.asarray(x, dtype=np.int64))
        att[i, : len(x)] = 1
    return ids, att
