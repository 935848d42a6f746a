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
from kdpipe.pipeline.offsets import ranges, starts
from kdpipe.pipeline.shards import PER_SAMPLE, PER_TARGET, PER_TOKEN, ShardData, gathered
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


@dataclass
class TeacherPass:
    """One shard's masked rows and the teacher's outputs, batch after batch, before they are
    gathered into columns (`shard_data`): what the teacher's thread makes; the gathering can then
    run elsewhere (a writer thread, with several writers)."""

    first_seq: int
    seqs: int  # sequences in the shard
    rows: list[MaskedSequence]  # (R,) in row order
    outs: list[TeacherOutputs]  # one per batch; empty when the mode runs no teacher
    order: np.ndarray  # (R,) the rows of the batches, batch after batch

    @property
    def tokens(self) -> int:
        return sum(len(r.input_ids) for r in self.rows)


def run_teacher(spec: RowSpec, runner: TeacherRunner | None, first_seq: int, seqs: list[np.ndarray],
                rows: list[MaskedSequence] | None = None) -> TeacherPass:
    """Mask (unless `rows` are the shard's masked rows already, from `mask_sequences` with these
    settings) and run the teacher (unless the mode is none) over one shard's sequences."""
    if rows is None:
        rows = mask_sequences(seqs, first_seq, spec.views, spec.masking, spec.vocab, spec.pool, spec.weights)
    masked = spec.target_positions == "masked"
    meta = [(first_seq + j, v) for j in range(len(seqs)) for v in range(spec.views)]
    outs: list[TeacherOutputs] = []
    order: list[int] = []  # the rows of the batches, batch after batch
    for batch in length_batches(rows, spec.batch_size) if runner is not None else []:
        ids, att = pad([rows[i].input_ids for i in batch], spec.pad_id)
        target_mask = None
        if masked:
            target_mask = torch.zeros(ids.shape, dtype=torch.bool)  # (B, T)
            for j, i in enumerate(batch):
                target_mask[j, torch.from_numpy(rows[i].positions)] = True
        uniforms = spec.mode.uniforms(spec.masking.seed, spec.samples, [
            (*meta[i], len(rows[i].input_ids), rows[i].positions if masked else None) for i in batch])
        outs.append(runner.run(ids, att, target_mask, uniforms))
        order.extend(batch)
    return TeacherPass(first_seq, len(seqs), rows, outs, np.array(order, dtype=np.int64))


def shard_data(spec: RowSpec, done: TeacherPass, stored: dict[str, np.dtype] | None = None) -> ShardData:
    """One shard's rows in row order, the teacher's outputs gathered into their columns.

    stored: the vector columns' stored dtypes (`shards.stored_dtypes`): each teacher column is
    then narrowed as it is gathered, in one pass, where all its values fit the stored dtype; a
    column holding a value that does not (a logit over float16's 65504, a NaN) stays as the
    teacher made it, so the value checks quote that value. Without it, columns keep the teacher's
    dtypes (the writer narrows them). The values are the same either way."""
    rows = done.rows
    length = np.array([len(r.input_ids) for r in rows], dtype=np.int64)  # (R,)
    mcount = np.array([len(r.positions) for r in rows], dtype=np.int64)  # (R,)
    n_target = mcount if spec.target_positions == "masked" else length
    targets = gather_outputs(done.outs, done.order, length, n_target, stored or {}) if done.outs else {}
    cat = lambda xs: np.concatenate(xs)  # noqa: E731
    seq_id = np.repeat(np.arange(done.first_seq, done.first_seq + done.seqs), spec.views)  # (R,)
    view = np.tile(np.arange(spec.views), done.seqs)  # (R,)
    return ShardData(
        seq_id=seq_id, view=view, length=length,
        input_ids=cat([r.input_ids for r in rows]), mlm_count=mcount,
        mlm_positions=cat([r.positions for r in rows]), mlm_labels=cat([r.labels for r in rows]),
        target_count=n_target.copy() if spec.mode.uses_teacher else None, **targets,
    )


def dump_shard(spec: RowSpec, runner: TeacherRunner | None, first_seq: int, seqs: list[np.ndarray],
               rows: list[MaskedSequence] | None = None, stored: dict[str, np.dtype] | None = None
               ) -> ShardData:
    """Mask, run the teacher, gather one shard's rows in row order (`run_teacher`, then `shard_data`)."""
    return shard_data(spec, run_teacher(spec, runner, first_seq, seqs, rows), stored)


_PER_TOKEN_OUT = tuple(n for n in PER_TOKEN if n != "input_ids")  # TeacherOutputs fields, an entry per token
_PER_TARGET_OUT = (*PER_TARGET, "sample_len")  # ... per target position


def gather_outputs(outs: list[TeacherOutputs], order: np.ndarray, length: np.ndarray, n_target: np.ndarray,
                   stored: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    """The batches' outputs (their rows `order`, batch after batch, each batch row-major) as flat
    shard columns in row order: each column is written once into one array, narrowed on the way
    (`stored`), and put in row order by one scatter where the batches are not consecutive rows
    already (packed sequences of one length always are). No per-row arrays."""
    consecutive = bool(np.array_equal(order, np.arange(len(order))))
    token_dest = target_dest = sample_dest = None  # (entries,) row-order index of each batch-order entry
    if not consecutive:
        token_dest = ranges(starts(length)[order], length[order])
        target_dest = ranges(starts(n_target)[order], n_target[order])
    cols: dict[str, np.ndarray] = {}
    for name in (*_PER_TOKEN_OUT, *_PER_TARGET_OUT, *PER_SAMPLE):
        parts = [getattr(o, name) for o in outs]
        if parts[0] is None:
            continue
        if name in PER_SAMPLE and not consecutive and sample_dest is None:
            sample_dest = _sample_dest(cols["sample_len"], order, n_target)
        dest = token_dest if name in _PER_TOKEN_OUT else target_dest if name in _PER_TARGET_OUT else sample_dest
        cols[name] = gathered(parts, dest, stored.get(name))
    return cols


def _sample_dest(sample_len: np.ndarray, order: np.ndarray, n_target: np.ndarray) -> np.ndarray:
    """(S,) row-order index of each batch-order draw, from the (P,) draws per target in row order."""
    per_row = np.diff(starts(sample_len)[starts(n_target)])  # (R,) draws of each row
    return ranges(starts(per_row)[order], per_row[order])
