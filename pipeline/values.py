"""Meaning, not only bytes: what a shard's values must satisfy, checked where they are made
(teacher-dump, before a shard is written), where they are used (the loader, every shard it
decodes) and by `kdpipe cache verify --deep`.

A hash proves a shard is the file the manifest lists, not that its values are sane: a re-hashed
shard holding NaN logits, or a teacher whose logits overflow float16, would otherwise train to a
NaN model. Every check is vectorised over the whole shard (a few passes over arrays just decoded);
each names the first offending row, its (sequence, view) and the column.

    cheap (every shard the loader reads, every shard the dump writes):
      rows: length in 1..seq_len, view below the views, seq_id inside the shard's range
      ids below the vocabulary (input_ids, mlm_labels, topk_ids, sample_ids)
      mlm_positions inside their row and ascending; targets at every token or every masked one
      sampled: at least one distinct draw per position, the counts summing to the draws N
      every stored float finite and within its stored dtype (float16: |x| <= 65504)
    deep (cache verify --deep): log Z[T] >= logsumexp(top-k logits / T) at each T of the grid
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from kdpipe.pipeline.shards import ShardData
from kdpipe.schemas.shard import manifest_schema, vector_layout

FLOAT_COLUMNS = ("hidden", "hidden_layers", "relation", "topk_logits", "log_z", "teacher_state")
ID_COLUMNS = ("input_ids", "mlm_labels", "topk_ids", "sample_ids")
# float16 rounds a logit z to within |z| * 2^-11: logsumexp of the rounded top-k may exceed the
# exact log Z (computed in float32 from the unrounded logits) by that much over T
_LOGZ_SLACK = 2.0 ** -10


@dataclass(frozen=True)
class Limits:
    """What a cache's settings allow (from its manifest, or from the dump's own settings)."""

    vocab_size: int
    seq_len: int
    views: int
    positions: str  # "all": a target at every token; "masked": at every masked one
    temperatures: tuple[float, ...]
    samples: int | None = None  # sampled: draws per position
    float_max: tuple[tuple[str, float], ...] = ()  # column -> largest magnitude its stored dtype holds

    def max_of(self, column: str) -> float:
        return dict(self.float_max).get(column, float(np.finfo(np.float32).max))


def float_limits(schema: pa.Schema) -> tuple[tuple[str, float], ...]:
    """The largest finite magnitude each float column of `schema` stores (float16: 65504)."""
    out = []
    for f in schema:
        if (layout := vector_layout(f)) is not None:
            dtype = layout[0]
        else:
            t = f.type
            while pa.types.is_list(t):
                t = t.value_type
            dtype = np.dtype(t.to_pandas_dtype()) if pa.types.is_primitive(t) else np.dtype(object)
        if dtype.kind == "f":
            out.append((f.name, float(np.finfo(dtype).max)))
    return tuple(out)


def limits_of(manifest: Any, schema: pa.Schema | None = None) -> Limits:
    """A finished cache's limits, from its manifest (and the shard schema it implies)."""
    views = int((manifest.fingerprint.get("masking") or {}).get("views") or 1)
    if schema is None:
        schema = manifest_schema(manifest)
    return Limits(manifest.vocab_size, manifest.seq_len, views, manifest.target_positions,
                  tuple(manifest.temperatures), manifest.samples, float_limits(schema))


class ValueProblem(ValueError):
    """The first value of a shard that breaks a check: where it is and what it is."""

    def __init__(self, row: int, data: ShardData | None, column: str, what: str, seq: str = "") -> None:
        self.row, self.column, self.what = row, column, what
        if data is not None and 0 <= row < data.rows:
            seq = f" (sequence {int(data.seq_id[row])}, view {int(data.view[row])})"
        self.seq = seq
        super().__init__(f"row {row}{seq}: {column} {what}")

    def shifted(self, start: int) -> "ValueProblem":
        """The same problem in a shard whose row group starts at row `start`."""
        return ValueProblem(self.row + start, None, self.column, self.what, self.seq)


def _row_of(offsets: np.ndarray, flat_index: int) -> int:
    """The row whose slice of a flat per-token (per-mask, per-target) array holds `flat_index`."""
    return int(np.searchsorted(offsets, flat_index, side="right") - 1)


def _out_of_range(v: np.ndarray, bound: float) -> bool:
    """Whether any value is NaN, infinite or beyond `bound`. float16 arithmetic is slow in numpy,
    so a float16 array is tested on its bits, by two integer maxima (no temporary array): every
    finite float16 is within its own range, and the non-finite ones are those whose exponent
    field is all ones, 0x7C00..0x7FFF (positive: the int16 view's maximum reaches them) and
    0xFC00..0xFFFF (negative: the top of the uint16 view)."""
    if v.dtype == np.float16:
        bits = np.ascontiguousarray(v).reshape(-1).view(np.int16)
        return int(bits.max()) >= 0x7C00 or int(bits.view(np.uint16).max()) >= 0xFC00
    top = np.abs(v).max()  # NaN propagates through max
    return not top <= bound


def _first(mask: np.ndarray) -> int | None:
    """Index of the first True of a 1-D mask, or None (argmax only after a cheap any())."""
    return int(mask.argmax()) if mask.any() else None


def check(data: ShardData, lim: Limits, first_seq: int | None = None, num_seqs: int | None = None,
          deep: bool = False) -> None:
    """Raise ValueProblem at the first value `data` should not hold; return quietly otherwise."""
    _check_rows(data, lim, first_seq, num_seqs)
    rows_of = {"input_ids": data.offsets(), "hidden": data.offsets(), "hidden_layers": data.offsets(),
               "relation": data.offsets(),
               "mlm_labels": data.mlm_offsets(),
               "mlm_positions": data.mlm_offsets(), **{c: data.target_offsets() for c in
                                                        ("topk_ids", "topk_logits", "log_z", "teacher_state")}}
    _check_ids(data, lim, rows_of)
    _check_positions(data, lim, rows_of)
    _check_floats(data, lim, rows_of)
    if deep:
        _check_log_z(data, lim, rows_of)


def _check_rows(data: ShardData, lim: Limits, first_seq: int | None, num_seqs: int | None) -> None:
    """Per-row fields: length, view and sequence id inside what the cache holds."""
    length = data.length.astype(np.int64)
    if (r := _first((length < 1) | (length > lim.seq_len))) is not None:
        raise ValueProblem(r, data, "length", f"is {int(length[r])}, outside 1..{lim.seq_len}")
    if (r := _first(data.view.astype(np.int64) >= lim.views)) is not None:
        raise ValueProblem(r, data, "view", f"is {int(data.view[r])}, but the cache has {lim.views} view(s)")
    if first_seq is not None and num_seqs is not None and data.rows:
        seq = data.seq_id.astype(np.int64)
        if (r := _first((seq < first_seq) | (seq >= first_seq + num_seqs))) is not None:
            raise ValueProblem(r, data, "seq_id", f"is {int(seq[r])}, outside this shard's sequences "
                                                  f"{first_seq}..{first_seq + num_seqs - 1}")


def _check_ids(data: ShardData, lim: Limits, rows_of: dict[str, np.ndarray | None]) -> None:
    """Every token id below the vocabulary (ids are unsigned: one max() per column)."""
    for name in ID_COLUMNS:
        v = getattr(data, name)
        if v is None or not v.size or int(v.max()) < lim.vocab_size:
            continue
        flat = int((v >= lim.vocab_size).reshape(len(v), -1).any(axis=1).argmax())
        if name == "sample_ids":  # a draw -> its target position -> its row
            row = _row_of(data.target_offsets(), _row_of(data.sample_offsets(), flat))
        else:
            row = _row_of(rows_of[name], flat)
        raise ValueProblem(row, data, name, f"holds {int(v.reshape(len(v), -1)[flat].max())}, not below the "
                                            f"vocabulary size {lim.vocab_size}")


def _check_positions(data: ShardData, lim: Limits, rows_of: dict[str, np.ndarray | None]) -> None:
    """Masked positions inside their row and ascending; targets where the position set says;
    sampled draws present and counted right."""
    length, mcount = data.length.astype(np.int64), data.mlm_count.astype(np.int64)
    if data.mlm_positions.size:
        pos = data.mlm_positions.astype(np.int64)
        row_len = np.repeat(length, mcount)  # (sum M,) the length of each one's row
        if (i := _first(pos >= row_len)) is not None:
            raise ValueProblem(_row_of(rows_of["mlm_positions"], i), data, "mlm_positions",
                               f"holds {int(pos[i])}, outside its row of {int(row_len[i])} tokens")
        same_row = np.repeat(np.arange(data.rows), mcount)
        if (i := _first((np.diff(pos) <= 0) & (same_row[1:] == same_row[:-1]))) is not None:
            raise ValueProblem(int(same_row[i]), data, "mlm_positions", "is not strictly ascending")
    if data.target_count is not None:
        want = length if lim.positions == "all" else mcount
        if (r := _first(data.target_count.astype(np.int64) != want)) is not None:
            kind = "tokens" if lim.positions == "all" else "masked positions"
            raise ValueProblem(r, data, "targets", f"number {int(data.target_count[r])} for {int(want[r])} {kind}")
    if data.sample_len is not None:
        toff = data.target_offsets()
        if (i := _first(data.sample_len.astype(np.int64) < 1)) is not None:
            raise ValueProblem(_row_of(toff, i), data, "sample_ids", "is empty at a target position")
        if lim.samples is not None and data.sample_counts.size:  # no empty segment: reduceat is exact
            sums = np.add.reduceat(data.sample_counts.astype(np.int64), data.sample_offsets()[:-1])
            if (i := _first(sums != lim.samples)) is not None:
                raise ValueProblem(_row_of(toff, i), data, "sample_counts",
                                   f"add up to {int(sums[i])}, not the cache's {lim.samples} draws")


def _check_floats(data: ShardData, lim: Limits, rows_of: dict[str, np.ndarray | None]) -> None:
    """Every stored float finite and within its stored dtype (one pass each; located only if bad)."""
    for name in FLOAT_COLUMNS:
        v = getattr(data, name)
        if v is None or not v.size or not _out_of_range(v, bound := lim.max_of(name)):
            continue
        bad = ~(np.abs(v) <= bound).reshape(len(v), -1)  # NaN compares False: caught with the rest
        flat = int(bad.any(axis=1).argmax())
        x = float(v.reshape(len(v), -1)[flat][bad[flat]][0])
        what = f"holds {x}" if not np.isfinite(x) else f"holds {x:.6g}, beyond its stored type's {bound:g}"
        raise ValueProblem(_row_of(rows_of[name], flat), data, name, what)


def _check_log_z(data: ShardData, lim: Limits, rows_of: dict[str, np.ndarray | None]) -> None:
    """log Z[T] >= logsumexp(top-k logits / T) at each T: else the tail mass would be negative."""
    if data.log_z is None or data.topk_logits is None or not len(data.log_z):
        return
    z = data.topk_logits.astype(np.float64)  # (P, k)
    for j, t in enumerate(lim.temperatures):
        top = z / t
        peak = top.max(axis=1)
        lse = peak + np.log(np.exp(top - peak[:, None]).sum(axis=1))  # (P,)
        slack = np.abs(z).max(axis=1) * _LOGZ_SLACK / t + 1e-4
        if (i := _first(data.log_z[:, j].astype(np.float64) < lse - slack)) is not None:
            raise ValueProblem(_row_of(rows_of["log_z"], i), data, "log_z",
                               f"at T={t:g} is {float(data.log_z[i, j]):.6g}, below the {float(lse[i]):.6g} "
                               "its own top-k logits add up to (the tail mass would be negative)")


def deep_problems(cache_dir: Any, manifest: Any, skip: set[str]) -> list[Any]:
    """`cache verify --deep`: every listed shard not in `skip` (its bytes are wrong already) read
    as the loader reads it, then checked as above with the log-partition check added, and its
    tokens against the manifest. One Problem per bad shard, naming the first bad row."""
    from kdpipe.pipeline.cache import Problem
    from kdpipe.pipeline.errors import CorruptShardError
    from kdpipe.pipeline.loader import read_shard

    lim = limits_of(manifest)
    out = []
    for entry in manifest.shards:
        if entry.path in skip:
            continue
        try:
            data = read_shard(cache_dir, entry, manifest)
            check(data, lim, entry.first_seq, entry.num_seqs, deep=True)
        except CorruptShardError as e:
            out.append(Problem(entry.path, e.what))
            continue
        except ValueProblem as e:
            out.append(Problem(entry.path, str(e)))
            continue
        if data.tokens != entry.tokens:
            out.append(Problem(entry.path, f"{data.tokens} tokens, the manifest says {entry.tokens}"))
    return out
