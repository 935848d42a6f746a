"""Masked LM on held-out text for `kdpipe eval`: the teacher's skill, and how closely each
student follows it.

The held-out text is packed like a teacher-dump corpus and masked once (view 0 of the masking
seed), so every model sees the very same masked tokens. One pass over the batches runs the
teacher once and every student after it, comparing each student with the teacher's logits of
that batch. Logits are made only at the masked positions: the model runs up to its decoder
(`teacher.decoder_bypassed`) and the decoder is applied to the N masked rows, not all B*T.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdpipe.pipeline import corpus as corpus_mod
from kdpipe.pipeline import metrics
from kdpipe.pipeline.compiling import Compile, compiled
from kdpipe.pipeline.device import autocast
from kdpipe.pipeline.dump import length_batches
from kdpipe.pipeline.errors import KdpipeError
from kdpipe.pipeline.fsutil import read_json
from kdpipe.pipeline.masking import MaskingSpec, Vocabulary, mask_sequences
from kdpipe.pipeline.models import Model
from kdpipe.pipeline.padding import pad
from kdpipe.pipeline.teacher import decoder_bypassed, decoder_of
from kdpipe.schemas.checkpoint import RUN_NAME
from kdpipe.schemas.manifest import FINGERPRINT_NAME

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Heldout:
    """Which held-out text, and how it becomes masked sequences."""

    sources: tuple[str, ...]  # files, globs, folders or a dataset, as given
    text_column: str = "text"
    sequences: int = 256  # scored, from the start of the text
    seq_len: int = 128
    packing: corpus_mod.Packing = "pack"
    masking: MaskingSpec = field(default_factory=MaskingSpec)
    batch_size: int = 64
    data_format: str = "auto"  # what the files are, where their names do not say (corpus.FORMATS)
    split: str = "train"  # of a dataset, a save_to_disk DatasetDict or a dataset repository folder
    column_flag: str = "--heldout-text-column"  # the stage's flag for text_column, named in errors


# ---------------------------------------------------------------------------------- set up

def resolve_heldout(h: Heldout) -> corpus_mod.Corpus:
    """The held-out corpus; a missing file is named as such, before any dataset lookup, and a
    missing text column now (its first text is read), not once the models have been loaded."""
    for src in h.sources:
        if corpus_mod.looks_like_path(src) and not any(c in src for c in "*?[") and not Path(src).exists():
            raise KdpipeError(f"held-out file {src} does not exist (--heldout)")
    try:
        corpus = corpus_mod.resolve_corpus(h.sources, h.text_column, h.split, h.data_format)
        next(corpus_mod.iter_texts(corpus), None)
        return corpus
    except KdpipeError as e:
        raise KdpipeError(f"held-out text (--heldout): {str(e).replace('--text-column', h.column_flag)}") from None


def check_comparable(teacher: Model, models: list[Model]) -> None:
    """Every model has a trained head, and every student the teacher's vocabulary."""
    for m in models:
        if m.missing_head:
            raise KdpipeError(f"{m.role} {m.name} ({m.path}) has no trained masked-LM head "
                              f"({len(m.missing_head)} weights missing, e.g. {m.missing_head[0]}); "
                              "its masked-LM scores would be random (leave out --heldout to skip them)")
        if m is teacher:
            continue
        if m.entry["vocab_size"] != teacher.entry["vocab_size"] or m.tokenizer_sha != teacher.tokenizer_sha:
            raise KdpipeError(f"student {m.name} uses another vocabulary than the teacher "
                              f"({m.entry['vocab_size']} vs {teacher.entry['vocab_size']} tokens, or "
                              "another tokenizer): masked-LM comparison needs the same one")


def overlap_warnings(students: list[Model], heldout: corpus_mod.Corpus) -> list[str]:
    """Best effort: a student whose cache was dumped from a held-out file has seen that text."""
    held = {f["sha256"]: f["name"] for f in heldout.fingerprint.get("files", [])}
    out = []
    for m in students:
        try:
            run = read_json(m.run_dir / RUN_NAME) if m.run_dir else {}
            cache = Path(run["cache"]) if isinstance(run, dict) and "cache" in run else None
            fp_path = cache / FINGERPRINT_NAME if cache else None
            fp = read_json(fp_path) if fp_path and fp_path.is_file() else {}
            seen = {f.get("sha256") for f in fp.get("corpus", {}).get("files", [])}
        except (KdpipeError, OSError, TypeError, AttributeError):
            continue
        for sha in sorted(seen & held.keys()):
            out.append(f"student {m.name} was distilled from a cache made from {held[sha]}, which is "
                       "also held-out text here: its masked-LM scores are not on unseen text")
    return out


# ------------------------------------------------------------------------------------- run

def heldout_batches(h: Heldout, corpus: corpus_mod.Corpus, tokenizer: Any, vocab_size: int
                    ) -> tuple[list[Batch], int, int]:
    """The held-out sequences, masked once (seed, sequence id, view 0), in padded batches
    longest first: (input_ids (B, T), attention_mask (B, T), masked positions (B, T) bool,
    labels (N,)); with the number of sequences and of tokens."""
    seqs = list(itertools.islice(
        corpus_mod.iter_sequences(corpus, tokenizer, h.seq_len, h.packing), h.sequences))
    if not seqs:
        raise KdpipeError(f"held-out text {', '.join(h.sources)} holds no text")
    special = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    vocab = Vocabulary(vocab_size, tokenizer.mask_token_id, special)
    pool = vocab.random_pool()
    masked = mask_sequences(seqs, 0, 1, h.masking, vocab, pool)
    batches = []
    for batch in length_batches(masked, h.batch_size):
        rows = [masked[i] for i in batch]
        ids, att = pad([r.input_ids for r in rows], tokenizer.pad_token_id)
        sel = torch.zeros_like(ids, dtype=torch.bool)
        for j, r in enumerate(rows):
            sel[j, torch.from_numpy(r.positions)] = True
        labels = torch.from_numpy(np.concatenate([r.labels for r in rows])).long()
        if labels.numel():
            batches.append((ids, att, sel, labels))
    if not batches:
        raise KdpipeError("held-out text gives no maskable tokens")
    return batches, len(seqs), sum(len(x) for x in seqs)


@torch.inference_mode()
def masked_logits(model: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor, sel: torch.Tensor,
                  device: torch.device, role: str = "teacher", forward: Any = None) -> torch.Tensor:
    """(N, V) float32 logits at the masked positions only: the decoder runs on N rows, not B*T.
    `forward`: what runs `model` (torch.compile's wrapper of it), the model itself if None."""
    dec, run = decoder_of(model, role), model if forward is None else forward
    with autocast(device), decoder_bypassed(model):
        x = run(input_ids=ids.to(device), attention_mask=att.to(device)).logits  # (B, T, H')
    return dec(x[sel.to(device)].float()).float()  # (N, V); row-major order of (b, t), as labels


def score(h: Heldout, corpus: corpus_mod.Corpus, teacher: Model, pending: list[Model],
          device: torch.device, compile_spec: Compile | None = None) -> dict[str, dict[str, Any]]:
    """One pass over the held-out batches scoring every pending model (the teacher among them
    or not) against the teacher: model name -> MlmResult fields, seconds, sequences, tokens.
    With `compile_spec` every model runs compiled (the seconds then include compiling)."""
    batches, n_seq, n_tok = heldout_batches(h, corpus, teacher.tokenizer, teacher.entry["vocab_size"])
    teacher_lm = teacher.module.to(device)
    forward = {m.name: compiled(m.module.to(device), compile_spec) for m in [teacher, *pending]}
    sums = {m.name: metrics.MlmSums() for m in pending}
    seconds = {m.name: 0.0 for m in pending}
    for ids, att, sel, labels in batches:
        labels = labels.to(device)
        t0 = time.perf_counter()
        zt = masked_logits(teacher_lm, ids, att, sel, device, forward=forward[teacher.name])  # (N, V)
        t_teacher = time.perf_counter() - t0
        for m in pending:
            if m.role == "teacher":
                sums[m.name].add(zt, labels)
                seconds[m.name] += t_teacher
                continue
            t0 = time.perf_counter()
            z = masked_logits(m.module, ids, att, sel, device, f"student {m.name}", forward[m.name])  # (N, V)
            seconds[m.name] += time.perf_counter() - t0
            sums[m.name].add(z, labels, zt)
    return {name: {**sums[name].result(), "model": name, "seconds": round(seconds[name], 3),
                   "sequences": n_seq, "tokens": n_tok} for name in sums}
