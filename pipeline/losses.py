"""The three DistilBERT losses, computed from the cache and one student forward pass.

    loss = alpha_ce * L_ce + alpha_mlm * L_mlm + alpha_cos * L_cos

L_ce is a **KL divergence** (not a cross-entropy: it is 0 when the student matches the teacher,
and has the same gradient as the reference's cross-entropy, whose `nn.KLDivLoss` it follows),
computed from what the cache stores: the teacher's top-k raw logits z_i and log_z = log
sum_v exp(z_v / T) over the full vocabulary. At temperature T the teacher's probabilities of its
top-k tokens are exact,

    p_i = exp(z_i / T - log_z_T),      and the rest of its mass is  r = 1 - sum_i p_i

(known, not assumed 0: at T = 2 it is most of the mass). Both distributions are coarse-grained to
k + 1 outcomes, the teacher's k top tokens and one tail bucket holding everything else:

    L_ce = T^2 * mean_positions [ sum_i p_i (log p_i - log q_i) + r (log r - log Q_tail) ]

with q the student's softmax(s / T) and Q_tail = 1 - sum_i q_i, the student's mass outside the
teacher's top-k. With k = V (no tail) this is exactly the reference's full KL(p || q) * T^2; with
k < V it is a lower bound of it (coarse-graining never increases a KL), equal to it when the
student's tail is proportional to the teacher's. log Q_tail is log1p(-sum q) where sum q < 1/2,
and an exact logsumexp over the non-top-k logits for the (rare) rows where it is not, so it is
accurate however small the tail gets. The positions are every non-padding token (the reference's
default), or the masked ones only (`ce_masked_only`, the reference's restrict_ce_to_mask).

L_mlm: cross-entropy of the student's logits at the masked positions against the cache labels,
mean over the masked positions of the batch.

L_cos: mean over non-padding tokens of 1 - cos(student last hidden state mapped into the cache's
projection space, cached teacher projection): the reference's CosineEmbeddingLoss with target 1.

L_layer (alpha_layer_cos, off by default; not in DistilBERT): the same cosine loss at each matched
layer below the last (pipeline/layer_targets.py says which), averaged over those layers.

L_rel (alpha_relation, off by default; MiniLM/MiniLMv2's, not DistilBERT's): for each part X of
q, k, v the cache stores for one teacher layer, and the same part of the student's matched layer,
each split into R relation heads, KL(softmax(X_t X_t^T / sqrt(d_t)) || softmax(X_s X_s^T /
sqrt(d_s))) over the keys of each row's real tokens, averaged over parts, relation heads and the
real tokens (queries); float32 whatever the autocast (pipeline/relation_targets.py).

Efficiency: the student body runs once; the MLM head (and its (P, V) logits) runs only on the
positions some loss needs; the teacher side is gathered at the top-k ids, never a (P, V) tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Rows whose student mass on the teacher's top-k reaches this get the exact tail logsumexp.
_EXACT_TAIL_FROM = 0.5

# DistilBERT reference (examples/research_projects/distillation/train.py): --alpha_ce, --alpha_mlm,
# --alpha_cos, --temperature. The defaults of LossSpec, student-train's config and its help text.
REFERENCE_ALPHA_CE = 5.0
REFERENCE_ALPHA_MLM = 2.0
REFERENCE_ALPHA_COS = 1.0
REFERENCE_TEMPERATURE = 2.0
DEFAULT_ALPHA_LAYER_COS = 0.0  # L_layer is kdpipe's, off unless asked for
DEFAULT_ALPHA_RELATION = 0.0  # L_rel: off unless asked for (bench/RESULTS.md, issue 16)


@dataclass(frozen=True)
class LossSpec:
    alpha_ce: float = REFERENCE_ALPHA_CE
    alpha_mlm: float = REFERENCE_ALPHA_MLM
    alpha_cos: float = REFERENCE_ALPHA_COS
    temperature: float = REFERENCE_TEMPERATURE
    ce_masked_only: bool = False
    targets: str = "topk"  # the cache's target mode (pipeline/modes), which computes L_ce
    cache_positions: str = "all"  # where the cache holds targets: all | masked
    alpha_layer_cos: float = DEFAULT_ALPHA_LAYER_COS
    # L_layer's pairs: (student hidden_states index, block of the cache's hidden_layers column)
    layer_pairs: tuple[tuple[int, int], ...] = ()
    alpha_relation: float = DEFAULT_ALPHA_RELATION
    relation_input: int = 0  # L_rel: the student's hidden_states index feeding its matched layer
    relation_parts: int = 0  # L_rel: parts of q, k, v in the cache's relation column
    relation_heads: int = 0  # L_rel: R


@dataclass
class LossTerms:
    """The weighted total (for backward) and each term, or None for a term whose weight is 0."""

    loss: torch.Tensor
    ce: torch.Tensor | None
    mlm: torch.Tensor | None
    cos: torch.Tensor | None
    layer_cos: torch.Tensor | None = None
    relation: torch.Tensor | None = None


def teacher_log_probs(topk_logits: torch.Tensor, log_z: torch.Tensor, temperature: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, k) log p_i of the teacher's top-k at T, and (P,) tail mass r = 1 - sum p (>= 0)."""
    log_p = topk_logits.float() / temperature - log_z.float()[:, None]  # (P, k)
    r = (1.0 - log_p.exp().sum(-1)).clamp(min=0.0)  # (P,) fp16 logits can push sum p a hair over 1
    return log_p, r


def topk_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logits: torch.Tensor,
            log_z: torch.Tensor, temperature: float) -> torch.Tensor:
    """(P,) per-position KL between teacher and student coarse-grained to top-k + tail (not
    scaled by T^2). student_logits (P, V) raw; topk_ids/topk_logits (P, k); log_z (P,) at T."""
    vocab, k = student_logits.shape[-1], topk_ids.shape[-1]
    log_p, r = teacher_log_probs(topk_logits, log_z, temperature)
    z = student_logits.float() / temperature  # (P, V)
    lse = torch.logsumexp(z, dim=-1)  # (P,)
    log_q = z.gather(1, topk_ids) - lse[:, None]  # (P, k)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (P,)
    if k == vocab:  # no tail: the full KL
        return kl
    sum_q = log_q.exp().sum(-1)  # (P,)
    log_tail = torch.log1p(-sum_q.clamp(max=_EXACT_TAIL_FROM))  # (P,) exact below the clamp
    hi = (sum_q.detach() >= _EXACT_TAIL_FROM).nonzero().squeeze(1)
    if hi.numel():
        zt = z[hi].scatter(1, topk_ids[hi], float("-inf"))  # (H, V) the non-top-k logits
        log_tail = log_tail.index_put((hi,), torch.logsumexp(zt, dim=-1) - lse[hi])
    return kl + torch.xlogy(r, r) - r * log_tail


def sampled_ce(student_logits: torch.Tensor, sample_ids: torch.Tensor, sample_counts: torch.Tensor,
               temperature: float) -> torch.Tensor:
    """(P,) unbiased estimate of the cross-entropy H(p_T, q_T) from N draws of p_T (sampled mode):
    -sum_u (c_u / N) log q_u; its gradient q - c/N is unbiased for the exact q - p. Padded draws
    have count 0. student_logits (P, V); sample_ids, sample_counts (P, S)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(1, sample_ids)  # (P, S)
    w = sample_counts.float() / sample_counts.sum(-1, keepdim=True).clamp_min(1).float()
    return -(w * log_q).sum(-1)


def exact_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
             ) -> torch.Tensor:
    """(P,) the full-vocabulary KL(p_T || q_T). Both (P, V)."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


UNLABELLED = -100  # the class of a transfer example: no cross-entropy term (F.cross_entropy's ignore_index)


def task_distill_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                      alpha: float, temperature: float) -> torch.Tensor:
    """Fine-tuning against a fine-tuned teacher as well as the labels (DistilBERT's section 4.2,
    after Hinton et al.): (1 - alpha) * CE(logits, labels) + alpha * T^2 * mean KL(p_T || q_T).
    The CE is the mean over the labelled rows (UNLABELLED: a transfer example, soft label only;
    0 where the batch has none), the KL over all. logits and teacher_logits (B, C), labels (B,);
    float32 whatever the autocast."""
    labelled = (labels != UNLABELLED).sum().clamp(min=1)
    ce = F.cross_entropy(logits.float(), labels, ignore_index=UNLABELLED, reduction="sum") / labelled
    kl = exact_kl(logits, teacher_logits, temperature).mean()
    return (1 - alpha) * ce + alpha * temperature ** 2 * kl


EXACT_CHUNK_ROWS = 1024  # teacher logits are rebuilt this many rows at a time


def exact_kl_from_state(student_logits: torch.Tensor, teacher_state: torch.Tensor,
                        head: tuple[torch.Tensor, torch.Tensor | None], temperature: float) -> torch.Tensor:
    """(P,) exact KL with the teacher's logits recomputed from the cached decoder input, in chunks
    so only (chunk, V) teacher logits exist at a time. head: decoder weight (V, H'), bias (V,)."""
    weight, bias = head
    out = []
    for i in range(0, teacher_state.shape[0], EXACT_CHUNK_ROWS):
        st = teacher_state[i:i + EXACT_CHUNK_ROWS].float()  # (C, H')
        zt = st @ weight.t() if bias is None else torch.addmm(bias, st, weight.t())  # (C, V)
        out.append(exact_kl(student_logits[i:i + EXACT_CHUNK_ROWS], zt, temperature))
    return torch.cat(out) if out else student_logits.new_zeros(0)


def ce_term(logits: torch.Tensor, batch, rows: torch.Tensor | None, spec: LossSpec,
            head: tuple[torch.Tensor, torch.Tensor | None] | None) -> torch.Tensor:
    """(P,) per-position L_ce (before T^2), computed by the cache's target mode; `rows` selects
    target rows when the cache holds targets at every position but the loss covers masked ones only."""
    from kdpipe.pipeline.modes import get_mode  # the modes import their L_ce from this module

    return get_mode(spec.targets).ce(logits, batch, rows, spec.temperature, head)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over masked positions; logits (M, V), labels (M,)."""
    return F.cross_entropy(logits.float(), labels, reduction="mean")


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean(1 - cos) over positions; both (N, d)."""
    return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)).mean()


def layer_cosine_loss(states: list[torch.Tensor], maps: list[nn.Module], teacher: torch.Tensor,
                      blocks: list[int]) -> torch.Tensor:
    """Mean over matched layers i of cosine_loss(maps[i](states[i]), teacher[:, blocks[i]]).
    states[i] (N, H_s) the student's hidden state at pair i; teacher (N, n, d) the cached layers."""
    terms = [cosine_loss(f(h), teacher[:, b]) for h, f, b in zip(states, maps, blocks)]
    return torch.stack(terms).mean()


_MASKED = -1e9  # a padded key's score: exp() of it is 0, and 0 * log of it stays finite (no NaN)


def relation_log_probs(x: torch.Tensor, keys: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, R, T, T) log softmax over keys of x_r x_r^T / sqrt(D / R) for each relation head r.
    x (B, T, D); keys (B, T) bool: the real tokens (padded keys get no mass)."""
    b, t, d = x.shape
    xh = x.float().reshape(b, t, heads, d // heads).transpose(1, 2)  # (B, R, T, D/R)
    scores = xh @ xh.transpose(-1, -2) / math.sqrt(d // heads)  # (B, R, T, T)
    return F.log_softmax(scores.masked_fill(~keys[:, None, None, :], _MASKED), dim=-1)


def relation_kl_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, parts: int,
                     heads: int) -> torch.Tensor:
    """Mean over parts, relation heads and real tokens of KL(teacher relation || student's).
    student (B, T, n * D_s), teacher (B, T, n * D_t): n parts side by side; mask (B, T)."""
    keys = mask.bool()
    with torch.autocast(student.device.type, enabled=False):  # float32 under any autocast
        terms = []
        for s, t in zip(student.float().chunk(parts, dim=-1), teacher.float().chunk(parts, dim=-1)):
            log_p, log_q = relation_log_probs(t, keys, heads), relation_log_probs(s, keys, heads)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, R, T) per query row
            terms.append(kl.mean(1)[keys].mean())  # over heads, then the real query rows
        return torch.stack(terms).mean()


def padded(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, w) zeros with a (N, w) per-token tensor at the mask's N true positions (row-major)."""
    out = flat.new_zeros((*mask.shape, flat.shape[-1]))
    out[mask.bool()] = flat
    return out


def distillation_loss(body: nn.Module, head: nn.Module, hidden_map: nn.Module, batch, spec: LossSpec,
                      teacher_head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                      relation: Callable[[torch.Tensor], torch.Tensor] | None = None) -> LossTerms:
    """All the terms from one student forward.

    body: (B, T) ids -> (B, T, H) last hidden state; head: (P, H) -> (P, V) MLM logits;
    hidden_map: (N, H) -> (N, d) into the cache's projection space (with L_layer, a
    layer_targets.WithLayerMaps holding each matched layer's map too); relation (with L_rel): the
    student's matched layer's projections, (B, T, H) layer input -> (B, T, n * D_s)
    (relation_targets.LayerParts). `batch` is a loader.Batch.
    """
    want_layers, want_relation = spec.alpha_layer_cos > 0, spec.alpha_relation > 0
    out = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
               **({"output_hidden_states": True} if want_layers or want_relation else {}))
    h = out[0]  # (B, T, H)
    valid = batch.attention_mask.bool()
    hv = h[valid]  # (N, H) non-padding positions, row-major as the cache
    total = hv.new_zeros((), dtype=torch.float32)
    ce = mlm = cos = None
    need_ce, need_mlm = spec.alpha_ce > 0, spec.alpha_mlm > 0 and batch.mlm_index.numel() > 0
    if need_ce or spec.alpha_mlm > 0:
        if need_ce and not spec.ce_masked_only:
            logits = head(hv)  # (N, V)
            ce_rows = None  # every non-padding position
            mlm_rows = batch.mlm_index
        else:
            logits = head(hv[batch.mlm_index])  # (M, V) masked positions only
            ce_rows = batch.mlm_index
            mlm_rows = torch.arange(batch.mlm_index.numel(), device=hv.device)
        if need_ce:
            rows = ce_rows if spec.cache_positions == "all" else None  # else already per masked position
            if logits.shape[0]:
                ce = ce_term(logits, batch, rows, spec, teacher_head).mean() * spec.temperature ** 2
            else:
                ce = total.clone()
            total = total + spec.alpha_ce * ce
        if spec.alpha_mlm > 0:
            mlm = mlm_loss(logits[mlm_rows], batch.mlm_labels) if need_mlm else total.new_zeros(())
            total = total + spec.alpha_mlm * mlm
    if spec.alpha_cos > 0:
        cos = cosine_loss(hidden_map(hv), batch.hidden)
        total = total + spec.alpha_cos * cos
    layer_cos = None
    if want_layers:
        states = [out.hidden_states[m][valid] for m, _ in spec.layer_pairs]  # each (N, H)
        layer_cos = layer_cosine_loss(states, list(hidden_map.layers), batch.hidden_layers,
                                      [b for _, b in spec.layer_pairs])
        total = total + spec.alpha_layer_cos * layer_cos
    rel = None
    if want_relation:
        student = relation(out.hidden_states[spec.relation_input])  # (B, T, n * D_s)
        rel = relation_kl_loss(student, padded(batch.relation, batch.attention_mask), batch.attention_mask,
                               spec.relation_parts, spec.relation_heads)
        total = total + spec.alpha_relation * rel
    return LossTerms(total, ce, mlm, cos, layer_cos, rel)
