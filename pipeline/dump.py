"""One shard of a cache, from token sequences: mask -> batch -> teacher -> per-row columns.

teacher-dump (stages/teacher_dump.py) decides which shards to make and writes them; this module
makes one. Every row is a pure function of (its sequence, sequence id, view) and the settings in
`RowSpec`: masks are drawn by `masking.mask_sequences`, the random numbers of a target mode's
reduction by the mode (`TargetMode.uniforms`, keyed by sequence, view and position), and
batching (by length, to keep padding small) never changes a row's values. So any shard can be
recomputed alone, by any rank, identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kdpipe.pipeline.masking import MaskedSequence, MaskingSpec, Vocabulary, mask_sequences
from kdpipe.pipeline.modes import TargetMode, get_mode
from kdpipe.pipeline.padding import pad
from kdpipe.pipeline.shards import PER_SAMPLE, PER_TARGET, ShardData
from kdpipe.pipeline.teacher import TeacherOutputs, TeacherRunner


@dataclass(frozen=True)
class RowSpec:
    """How a cache's rows are made: masking, target mode and position set, teacher batching."""

    masking: MaskingSpec
    views: int  # independent mask draws per sequence
    vocab: Vocabulary
    pool: np.ndarray  # ids a masked position may be replaced with
    weights: np.ndarray | None  # frequency-smoothed choice of masked positions, or uniform
    targets: str  # the target mode's name (pipeline/modes)
    target_positions: str  # all | masked
    samples: int  # draws per position (sampled mode)
    batch_size: int  # sequences per teacher forward
    pad_id: int

    @property
    def mode(self) -> TargetMode:
        return get_mode(self.targets)


def mask_rows(spec: RowSpec, seq_id: int, seq: np.ndarray) -> list[MaskedSequence]:
    """The `views` masked rows of one sequence."""
    return mask_sequences([seq], seq_id, spec.views, spec.masking, spec.vocab, spec.pool, spec.weights)


def length_batches(rows: list, batch_size: int) -> list[list[int]]:
    """Row indices grouped into batches of similar length (longest first), so padding is small."""
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i].input_ids), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def dump_shard(spec: RowSpec, runner: TeacherRunner | None, first_seq: int, seqs: list[np.ndarray],
               rows: list[MaskedSequence] | None = None) -> ShardData:
    """Mask (unless `rows` are the shard's masked rows already, from `mask_sequences` with these
    settings), run the teacher (unless the mode is none), gather one shard's rows in row order."""
    if rows is None:
        rows = mask_sequences(seqs, first_seq, spec.views, spec.masking, spec.vocab, spec.pool, spec.weights)
    meta = [(first_seq + j, v) for j in range(len(seqs)) for v in range(spec.views)]
    masked = spec.target_positions == "masked"
    n_target = np.array([len(r.positions) if masked else len(r.input_ids) for r in rows], dtype=np.int64)
    per_row: list[dict[str, np.ndarray]] = [{} for _ in rows]
    for batch in length_batches(rows, spec.batch_size) if runner is not None else []:
        ids, att = pad([rows[i].input_ids for i in batch], spec.pad_id)
        target_mask = None
        if masked:
            target_mask = torch.zeros(ids.shape, dtype=torch.bool)  # (B, T)
            for j, i in enumerate(batch):
                target_mask[j, torch.from_numpy(rows[i].positions)] = True
        uniforms = spec.mode.uniforms(spec.masking.seed, spec.samples, [
            (*meta[i], len(rows[i].input_ids), rows[i].positions if masked else None) for i in batch])
        _split_rows(runner.run(ids, att, target_mask, uniforms), batch, rows, n_target, per_row)
    cat = lambda xs: np.concatenate(xs)  # noqa: E731
    targets = {name: cat([d[name] for d in per_row]) for name in per_row[0]} if per_row[0] else {}
    return ShardData(
        seq_id=np.array([m[0] for m in meta]), view=np.array([m[1] for m in meta]),
        length=np.array([len(r.input_ids) for r in rows]),
        input_ids=cat([r.input_ids for r in rows]),
        mlm_count=np.array([len(r.positions) for r in rows]),
        mlm_positions=cat([r.positions for r in rows]), mlm_labels=cat([r.labels for r in rows]),
        target_count=n_target if spec.mode.uses_teacher else None, **targets,
    )


def _split_rows(o: TeacherOutputs, batch: list[int], rows: list[MaskedSequence], n_target: np.ndarray,
                per_row: list[dict[str, np.ndarray]]) -> None:
    """Cut a batch's outputs (row-major over the batch) back into per-row arrays."""
    tok = np.cumsum([0] + [len(rows[i].input_ids) for i in batch])
    tgt = np.cumsum([0] + [int(n_target[i]) for i in batch])
    smp = None if o.sample_len is None else np.concatenate([[0], np.cumsum(o.sample_len)])
    for j, i in enumerate(batch):
        d = per_row[i]
        d["hidden"] = o.hidden[tok[j]:tok[j + 1]]
        for name in ("hidden_layers", "relation"):  # per token, where stored
            if (v := getattr(o, name)) is not None:
                d[name] = v[tok[j]:tok[j + 1]]
        for name in (*PER_TARGET, "sample_len"):  # per target position
            v = getattr(o, name)
            if v is not None:
                d[name] = v[tgt[j]:tgt[j + 1]]
        if smp is not None:  # per draw: sample_len of them per target position
            lo, hi = smp[tgt[j]], smp[tgt[j + 1]]
            d.update({name: getattr(o, name)[lo:hi] for name in PER_SAMPLE})
