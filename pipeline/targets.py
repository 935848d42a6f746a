"""What a cache stores for L_ce, and the loss each choice implies.

Three target modes, chosen at dump time:

- topk: the k largest raw logits and log Z_T = log sum_v exp(z_v / T) for each T of a grid. The
  teacher's softened probabilities of the k tokens are exact; the rest of the mass, r = 1 - sum p,
  is known but not where it lies. L_ce is the KL divergence between teacher and student after both
  are coarse-grained to (k tokens + one tail bucket): exact when k = V, a lower bound otherwise
  (coarse-graining never increases KL).
- sampled: N draws with replacement from the teacher's softened distribution at one temperature,
  stored as (token, count). -sum_u (c_u / N) log q_u is an unbiased estimate of the full
  cross-entropy H(p, q), and its gradient with respect to the student logits, q - c / N, is an
  unbiased estimate of the exact gradient q - p (Anshumann et al., ACL 2025).
- exact: the teacher's decoder input and the frozen decoder; the full logits are recomputed in
  chunks at training time, so L_ce is the full-vocabulary KL at any temperature.

The fidelity functions compare each against the exact loss on the same positions: the error of
the loss, and the angle and norm ratio of its gradient w.r.t. the student logits.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------ sampling

def position_uniforms(seed: int, seq_id: int, view: int, positions: int, draws: int) -> np.ndarray:
    """(positions, draws) uniforms in [0, 1): a pure function of (seed, sequence, view), and the
    row of a position a pure function of that position (Philox counter blocks)."""
    key = np.random.SeedSequence([seed, seq_id, view, 0x5A]).generate_state(2, dtype=np.uint64)
    gen = np.random.Generator(np.random.Philox(key=key))
    return gen.random((positions, draws))


def sample_counts(logits: torch.Tensor, temperature: float, uniforms: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draws from softmax(logits / T), one row of uniforms per position.

    logits (C, V) float32, uniforms (C, N) in [0, 1). Returns ids (C, N) sorted ascending per row
    with duplicates, and counts (C, N): counts[c, j] is the number of draws of ids[c, j] at its
    first occurrence, 0 at the repeats, so (id, count) pairs with count > 0 are the unique draws.
    """
    p = torch.softmax(logits.double() / temperature, dim=-1)  # (C, V) float64: exact CDF
    cdf = torch.cumsum(p, dim=-1)
    cdf[:, -1] = 1.0
    ids = torch.searchsorted(cdf, uniforms.double().contiguous(), right=True)  # (C, N)
    ids = torch.clamp(ids, max=logits.shape[-1] - 1).sort(dim=-1).values
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    # a run of equal ids starts at each `first`; its count is the distance to the next start
    n = ids.shape[1]
    pos = torch.arange(n, device=ids.device).expand_as(ids)  # (C, N)
    starts = torch.where(first, pos, n)
    next_start = torch.full_like(starts, n)
    next_start[:, :-1] = starts[:, 1:].flip(-1).cummin(-1).values.flip(-1)  # first start after j
    counts = torch.where(first, next_start - pos, 0)  # (C, N), O(C N) memory
    return ids, counts


# ------------------------------------------------------------------------------------ fidelity

def gradient_fidelity(loss_fn, exact_fn, student_logits: torch.Tensor) -> tuple[float, float, float]:
    """Per-position gradient comparison w.r.t. the student logits (the paper's Table 3 measure)."""
    z1 = student_logits.detach().double().requires_grad_(True)
    z2 = student_logits.detach().double().requires_grad_(True)
    g1, = torch.autograd.grad(loss_fn(z1).sum(), z1)
    g2, = torch.autograd.grad(exact_fn(z2).sum(), z2)
    cos = F.cosine_similarity(g1, g2, dim=-1).clamp(-1, 1)
    ratio = g1.norm(dim=-1) / g2.norm(dim=-1).clamp_min(1e-30)
    return cos.mean().item(), torch.rad2deg(torch.acos(cos)).mean().item(), ratio.mean().item()
