"""More inputs for task distillation: training examples with word pieces the teacher re-guessed.

A student distilled on a task (`kdpipe eval --task-distill`) learns most from the teacher's logits
on inputs the teacher was not fine-tuned on (the transfer set, pipeline/downstream.py): on
bench/quality.py's tasks the gain grew with the transfer set's size. Where a task's training pool
holds fewer unlabelled examples than `--task-distill-transfer` asks, `--task-distill-augment` tops
the transfer set up with augmented copies of the training examples, as TinyBERT (Jiao et al.,
2020) does: in each copy every word piece other than the special tokens is replaced with
probability `rate` (at least one per copy), all of them masked at once, by a draw from the
pretrained teacher's `top_k` most likely tokens at that position (the original token and the
special tokens excluded), weighted by the teacher's probabilities. TinyBERT replaces whole words,
one at a time (p = 0.4, K = 15, GloVe neighbours for words of several pieces); here one forward
pass per copy, over word pieces. Their labels are never used: the teacher's logits are their
only target.

A copy is a pure function of (seed, example, copy number) and the teacher: its random numbers
come from a generator of its own, so batching does not change it. Copies are decoded to text, so
every model's tokenizer encodes them as it encodes the task's own texts.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from kdpipe.pipeline.errors import KdpipeError
from kdpipe.pipeline.mlm_eval import masked_logits
from kdpipe.pipeline.padding import pad

RATE = 0.3  # share of word pieces replaced in a copy
TOP_K = 15  # candidates per replaced piece (TinyBERT's K)
MAX_COPIES = 20  # copies of one training example at most (TinyBERT makes 20)
_TOKENS_PER_BATCH = 8192


def copy_seed(seed: int, example: int, copy: int) -> int:
    digest = hashlib.sha256(f"kdpipe-augment:{seed}:{example}:{copy}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sources(train: list[int], count: int) -> list[tuple[int, int]]:
    """(example, copy) of `count` augmented copies: each training example once, in training
    order, then each a second time, and so on."""
    if count and not train:
        raise KdpipeError("augmented copies need training examples to copy")
    return [(train[j % len(train)], j // len(train)) for j in range(count)]


def augment(mlm: torch.nn.Module, tokenizer: Any, texts: list[str], copies: list[tuple[int, int]],
            seed: int, max_length: int, device: torch.device, rate: float = RATE, top_k: int = TOP_K
            ) -> list[str]:
    """The text of each (example, copy) of `copies`: texts[example] with word pieces replaced by
    the masked LM `mlm`'s guesses (see the top)."""
    if tokenizer.mask_token_id is None:
        raise KdpipeError("augmenting a task needs a tokenizer with a [MASK] token")
    if not copies:
        return []
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    enc = tokenizer([texts[i] for i, _ in copies], truncation=True, max_length=max_length,
                    return_attention_mask=False, return_token_type_ids=False, verbose=False)["input_ids"]
    rows, chosen, draws = [], [], []
    for (example, copy), ids in zip(copies, enc):
        ids = torch.tensor(ids, dtype=torch.long)  # (T,)
        g = torch.Generator().manual_seed(copy_seed(seed, example, copy))
        u, d = torch.rand(len(ids), generator=g), torch.rand(len(ids), generator=g)  # (T,) each
        free = ~torch.isin(ids, special)
        pick = free & (u < rate)
        if free.any() and not pick.any():  # at least one piece per copy: the one of the smallest u
            pick[torch.where(free, u, 2.0).argmin()] = True
        rows.append(ids)
        chosen.append(pick)
        draws.append(d[pick])
    out: list[str] = [""] * len(copies)
    order = sorted(range(len(copies)), key=lambda j: len(rows[j]))  # batches of similar length
    mlm.eval()
    at = 0
    while at < len(order):
        width = len(rows[order[min(at + 255, len(order) - 1)]])
        take = order[at:at + max(1, min(256, _TOKENS_PER_BATCH // max(width, 1)))]
        at += len(take)
        masked = [torch.where(chosen[j], tokenizer.mask_token_id, rows[j]) for j in take]
        ids, att = pad([m.tolist() for m in masked], tokenizer.pad_token_id or 0)  # (B, T)
        sel = torch.zeros_like(ids, dtype=torch.bool)  # (B, T)
        for b, j in enumerate(take):
            sel[b, :len(rows[j])] = chosen[j]
        if not sel.any():
            for j in take:
                out[j] = tokenizer.decode(rows[j], skip_special_tokens=True)
            continue
        z = masked_logits(mlm, ids, att, sel, device).cpu().clone()  # (N, V): row-major over (b, t)
        z[:, special[special < z.shape[1]]] = float("-inf")
        start = 0
        for j in take:
            n = int(chosen[j].sum())
            zj = z[start:start + n]  # (n, V)
            start += n
            new = rows[j].clone()
            if n:
                zj[torch.arange(n), rows[j][chosen[j]]] = float("-inf")  # never the original
                top = zj.topk(min(top_k, zj.shape[1] - 1), dim=-1)  # (n, K)
                cdf = top.values.softmax(-1).cumsum(-1)  # (n, K)
                k = (cdf < draws[j][:, None]).sum(-1).clamp(max=cdf.shape[1] - 1)  # (n,)
                new[chosen[j]] = top.indices[torch.arange(n), k]
            out[j] = tokenizer.decode(new, skip_special_tokens=True)
    return out
