"""One shard: numpy arrays <-> an Arrow table <-> a zstd Parquet file written atomically.

Columns are built from flat arrays and offsets (no Python lists per token), with the explicit
schema of `kdpipe.schemas.shard` passed to the writer, never inferred. Vector columns (one
fixed-width vector per token or target position) go through `encode_vectors` / `decode_vectors`:
the flat (n, width) buffer is the column's data, so neither side touches a value on its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe.pipeline.fsutil import atomic_write
from kdpipe.pipeline.offsets import starts
from kdpipe.schemas.shard import FINGERPRINT_KEY, SHARD_PATTERN, shard_path, vector_layout  # noqa: F401  (used from here)

ROW_GROUP_ROWS = 256


@dataclass
class ShardData:
    """A shard's rows as flat arrays; per-token, per-mask and per-target arrays are concatenated
    over rows. Target fields are None where the cache's mode stores no such column."""

    seq_id: np.ndarray  # (R,)
    view: np.ndarray  # (R,)
    length: np.ndarray  # (R,) tokens per row; offsets into per-token arrays are its cumsum
    input_ids: np.ndarray  # (sum T,)
    mlm_count: np.ndarray  # (R,) masked positions per row
    mlm_positions: np.ndarray  # (sum M,)
    mlm_labels: np.ndarray  # (sum M,)
    hidden: np.ndarray | None = None  # (sum T, d)
    hidden_layers: np.ndarray | None = None  # (sum T, n * d) other layers' states, d each (layer_targets.py)
    relation: np.ndarray | None = None  # (sum T, n * D) one layer's attention projections (relation_targets.py)
    target_count: np.ndarray | None = None  # (R,) target positions per row: length, or mlm_count
    topk_ids: np.ndarray | None = None  # (sum P, k)
    topk_logits: np.ndarray | None = None  # (sum P, k)
    log_z: np.ndarray | None = None  # (sum P, n_T)
    sample_len: np.ndarray | None = None  # (sum P,) distinct draws per target position
    sample_ids: np.ndarray | None = None  # (sum S,)
    sample_counts: np.ndarray | None = None  # (sum S,)
    teacher_state: np.ndarray | None = None  # (sum P, H')

    def __post_init__(self) -> None:
        has_targets = any(getattr(self, n) is not None for n in (*PER_TARGET, *PER_SAMPLE))
        if self.target_count is None and has_targets:
            self.target_count = self.length  # targets at every position unless told otherwise

    @property
    def rows(self) -> int:
        return len(self.seq_id)

    @property
    def tokens(self) -> int:
        return int(self.length.sum())

    def offsets(self) -> np.ndarray:
        """(R + 1,) start of each row in the per-token arrays."""
        return starts(self.length)

    def mlm_offsets(self) -> np.ndarray:
        return starts(self.mlm_count)

    def target_offsets(self) -> np.ndarray | None:
        return None if self.target_count is None else starts(self.target_count)

    def sample_offsets(self) -> np.ndarray | None:
        return None if self.sample_len is None else starts(self.sample_len)


PER_TOKEN = ("input_ids", "hidden", "hidden_layers", "relation")
PER_MASK = ("mlm_positions", "mlm_labels")
PER_TARGET = ("topk_ids", "topk_logits", "log_z", "teacher_state")
PER_SAMPLE = ("sample_ids", "sample_counts")  # list<list<...>>: per target, then per draw


def _offsets(counts: np.ndarray) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), pa.int32())


def _list(values: np.ndarray, counts: np.ndarray, field_type: pa.ListType) -> pa.Array:
    inner = field_type.value_type
    values_arr = pa.array(values.astype(inner.to_pandas_dtype(), copy=False), inner)
    return pa.ListArray.from_arrays(_offsets(counts), values_arr, type=field_type)


def encode_vectors(values: np.ndarray, counts: np.ndarray, field: pa.Field) -> pa.Array:
    """A vector column (schemas.shard) from (sum n, width) values, counts[r] of them in row r: the
    flat buffer itself becomes the column's data, the row offsets its offsets (no copy when the
    values already have the stored dtype)."""
    dtype, width = _layout(field)
    v = as_stored(values, dtype)
    if v.ndim != 2 or v.shape[1] != width or len(v) != int(counts.sum()):
        raise ValueError(f"{field.name}: ({int(counts.sum())}, {width}) values wanted, not {v.shape}")
    offsets = starts(counts) * (width * dtype.itemsize)  # (R + 1,) bytes
    return pa.Array.from_buffers(pa.large_binary(), len(counts),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(v.reshape(-1).view(np.uint8))])


def as_stored(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`values` as a contiguous array of `dtype` (no copy if it is one). numpy narrows to float16
    value by value, ~30x slower than torch's vector instructions: on a 2-core machine that was a
    quarter of a shard's encoding."""
    if dtype == np.float16 and values.dtype != np.float16:
        import torch

        return torch.from_numpy(np.ascontiguousarray(values, np.float32)).half().numpy()
    return np.ascontiguousarray(values, dtype)


def store(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src in dst's dtype, in one pass: to float16 as `as_stored` narrows (by torch,
    from float32), any other cast by numpy."""
    if dst.dtype == np.float16 and src.dtype != np.float16:
        import torch

        torch.from_numpy(dst).copy_(torch.from_numpy(np.ascontiguousarray(src, np.float32)))
    else:
        dst[...] = src


def fits(values: np.ndarray, dtype: np.dtype) -> bool:
    """Whether every value is finite and holds in `dtype` as it is (a float within its range, an
    integer within its bounds): narrowing then loses nothing a check could see. Other casts never."""
    if values.dtype == dtype or not values.size:
        return True
    kinds = (values.dtype.kind, dtype.kind)
    if kinds[0] == "f" and kinds[1] == "f":
        bound = float(np.finfo(dtype).max)
        return bool(-bound <= values.min() and values.max() <= bound)  # NaN compares False
    if kinds[0] in "iu" and kinds[1] in "iu":
        info = np.iinfo(dtype)
        return bool(info.min <= values.min() and values.max() <= info.max)
    return False


def gathered(parts: list[np.ndarray], dest: np.ndarray | None, dtype: np.dtype | None = None) -> np.ndarray:
    """The concatenation of `parts` (along the first axis), entry j moved to dest[j] (None: left
    where it is), in `dtype` where every value fits it, else in the parts' own dtype (so a value
    that does not fit is kept for the value checks to quote). Each part is written once, narrowed
    on the way; a scatter costs one more pass."""
    own = np.result_type(*parts)
    if dtype is None or (dtype.kind != "f" and not all(fits(p, dtype) for p in parts)):
        dtype = own
    out = _joined(parts, dtype)
    if dtype != own and dtype.kind == "f" and _may_not_fit(out) and not all(fits(p, dtype) for p in parts):
        out = _joined(parts, own)
    if dest is None:
        return out
    moved = np.empty_like(out)
    moved[dest] = out
    return moved


def _joined(parts: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    out = np.empty((sum(len(p) for p in parts), *parts[0].shape[1:]), dtype)
    at = 0
    for p in parts:
        store(out[at:at + len(p)], p)
        at += len(p)
    return out


def _may_not_fit(narrowed: np.ndarray) -> bool:
    """Whether a float16 array narrowed from wider floats holds a value that may not have fit:
    NaN, infinity, or the largest finite magnitude 65504 (what (65504, 65520) rounds to). Tested
    on the bits by two integer maxima, so the float32 source is read once, by the narrowing; only
    then are the source's values themselves tested."""
    if narrowed.dtype != np.float16 or not narrowed.size:
        return narrowed.dtype != np.float16
    bits = narrowed.reshape(-1).view(np.int16)
    return int(bits.max()) >= 0x7BFF or int(bits.view(np.uint16).max()) >= 0xFBFF


def stored_dtypes(schema: pa.Schema) -> dict[str, np.dtype]:
    """Each vector column's stored dtype (float16 hidden states, uint16 ids, ...)."""
    return {f.name: layout[0] for f in schema if (layout := vector_layout(f)) is not None}


def narrowed(data: ShardData, schema: pa.Schema) -> ShardData:
    """`data` with every vector column in its stored dtype (float16 hidden states, uint16 ids), as
    `to_table` stores it."""
    out = {f.name: getattr(data, f.name) for f in fields(ShardData)}
    for f in schema:
        if (layout := vector_layout(f)) is not None and out.get(f.name) is not None:
            out[f.name] = as_stored(out[f.name], layout[0])
    return ShardData(**out)


def decode_vectors(col: pa.ChunkedArray | pa.Array, field: pa.Field) -> tuple[np.ndarray, np.ndarray]:
    """(sum n, width) values and (R,) entries per row of a vector column: a read-only view of the
    column's data buffer (one copy only when it comes in several chunks). Raises LayoutError at
    a row whose bytes are not a whole number of entries."""
    dtype, width = _layout(field)
    entry = dtype.itemsize * width
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    values, counts, start = [], [], 0
    for c in chunks:
        if not len(c):
            continue
        _, off_buf, data = c.buffers()
        off = np.frombuffer(off_buf, np.int64, count=len(c) + 1, offset=8 * c.offset)
        nbytes = np.diff(off)
        if (bad := np.flatnonzero(nbytes % entry)).size:
            r = int(bad[0])
            raise LayoutError(start + r, field.name, f"holds {int(nbytes[r])} bytes, not a whole number "
                                                     f"of {entry}-byte entries ({width} x {dtype.name})")
        n = int(off[-1] - off[0]) // dtype.itemsize
        values.append(np.frombuffer(data, dtype, count=n, offset=int(off[0])).reshape(-1, width) if n
                      else np.zeros((0, width), dtype))
        counts.append(nbytes // entry)
        start += len(c)
    if len(values) != 1:
        return (np.concatenate(values) if values else np.zeros((0, width), dtype),
                np.concatenate(counts) if counts else np.zeros(0, np.int64))
    return values[0], counts[0]


def _layout(field: pa.Field) -> tuple[np.dtype, int]:
    layout = vector_layout(field)
    if layout is None:
        raise LayoutError(0, field.name, "is not a vector column (no kdpipe.dtype / kdpipe.width field metadata)")
    return layout


def to_table(data: ShardData, schema: pa.Schema) -> pa.Table:
    """The shard's Arrow table, from flat arrays and offsets (no Python objects per value)."""
    cols = []
    for f in schema:
        v = getattr(data, f.name)
        count = _COUNT_OF.get(f.name)
        if vector_layout(f) is not None:
            cols.append(encode_vectors(v, getattr(data, count), f))
        elif f.name in PER_SAMPLE:
            inner = _list(v, data.sample_len, f.type.value_type)
            cols.append(pa.ListArray.from_arrays(_offsets(data.target_count), inner, type=f.type))
        elif count is not None:
            cols.append(_list(v, getattr(data, count), f.type))
        else:
            cols.append(pa.array(v.astype(f.type.to_pandas_dtype(), copy=False), f.type))
    return pa.Table.from_arrays(cols, schema=schema)


_COUNT_OF = {**{c: "length" for c in PER_TOKEN}, **{c: "mlm_count" for c in PER_MASK},
             **{c: "target_count" for c in PER_TARGET}}  # the ShardData count a column's entries follow


def encode_shard(table: pa.Table, sink: Any, zstd_level: int) -> None:
    """The shard's Parquet encoding (zstd, plain: no dictionary, no statistics), into a file or a
    buffer: one place, so a dry run's size estimate is the size a dump writes. Vector columns are
    one plain binary value per row, which Parquet copies as it is; byte-stream split, which
    compressed version 2's float16 values some 10-25% better, applies to float columns only
    (bench/RESULTS.md, issue 17, weighs the two)."""
    pq.write_table(
        table, sink, row_group_size=ROW_GROUP_ROWS, compression="zstd",
        compression_level=zstd_level, use_dictionary=False, write_statistics=False, store_schema=True,
    )


def shard_bytes(table: pa.Table, fingerprint_sha256: str, zstd_level: int) -> pa.Buffer:
    """The file's bytes; the fingerprint in the footer ties the file to its cache's settings."""
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), FINGERPRINT_KEY: fingerprint_sha256.encode()}
    )
    sink = pa.BufferOutputStream()
    encode_shard(table, sink, zstd_level)
    return sink.getvalue()


def write_shard(path: Path, table: pa.Table, fingerprint_sha256: str, zstd_level: int) -> None:
    """Write atomically (the stage writes through `writers.ShardWriters`)."""
    buf = shard_bytes(table, fingerprint_sha256, zstd_level)
    atomic_write(path, lambda f: f.write(buf))


def column_bytes(path: Path) -> dict[str, int]:
    """Compressed bytes per top-level column, from the footer."""
    md = pq.ParquetFile(path).metadata
    out: dict[str, int] = {}
    for rg in range(md.num_row_groups):
        g = md.row_group(rg)
        for c in range(g.num_columns):
            col = g.column(c)
            name = col.path_in_schema.split(".")[0]
            out[name] = out.get(name, 0) + col.total_compressed_size
    return out


def _flat(col: pa.ChunkedArray | pa.Array, depth: int) -> np.ndarray:
    arr = _column(col)
    for _ in range(depth):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False)


def _list_lengths(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Entries per row of a list column, from its offsets alone (combining the chunks would copy
    the values)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    parts = [np.diff(c.offsets.to_numpy()) for c in chunks]
    return (np.concatenate(parts) if parts else np.zeros(0)).astype(np.int64)


def _column(arr: pa.ChunkedArray | pa.Array) -> pa.Array:
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


class LayoutError(ValueError):
    """A row whose columns disagree on how many entries it has (a per-token column shorter than
    `length`, say): the flat arrays' offsets would silently pair values with the wrong rows."""

    def __init__(self, row: int, column: str, what: str) -> None:
        self.row, self.column, self.what = row, column, what
        super().__init__(f"row {row}: {column} {what}")

    def shifted(self, start: int) -> "LayoutError":
        """The same problem in a shard whose row group starts at row `start`."""
        return LayoutError(self.row + start, self.column, self.what)


def _check_layout(entries: dict[str, np.ndarray], kwargs: dict[str, np.ndarray]) -> None:
    """Every column's entries per row against the count it must equal (cheap: offsets only)."""
    counts = {"length": kwargs.get("length"), "mlm_positions": kwargs["mlm_count"],
              "targets": kwargs.get("target_count")}
    rule = {**{c: "length" for c in PER_TOKEN}, "mlm_labels": "mlm_positions",
            **{c: "targets" for c in (*PER_TARGET, *PER_SAMPLE)}}
    for name, got in entries.items():
        ref = counts.get(rule.get(name, ""))
        if ref is None:
            continue
        if len(got) != len(ref):
            raise LayoutError(0, name, f"holds {len(got)} entries, but its row count says {len(ref)}")
        if (bad := np.flatnonzero(got != ref)).size:
            r = int(bad[0])
            raise LayoutError(r, name, f"holds {int(got[r])} entries, but its {rule[name]} says {int(ref[r])}")


def from_table(table: pa.Table | pa.RecordBatch) -> ShardData:
    """Flat numpy arrays of a table (or row group) in the shard schema; absent columns are None.
    Vector columns come back as views of the table's buffers (read-only). Raises LayoutError
    where a row's columns disagree on its number of entries."""
    schema = table.schema
    names = set(table.column_names)
    kwargs: dict[str, np.ndarray] = {"mlm_count": _list_lengths(table.column("mlm_positions"))}
    entries: dict[str, np.ndarray] = {}  # column -> (R,) entries per row
    for f in fields(ShardData):
        if f.name not in names:
            continue
        col, field = table.column(f.name), schema.field(f.name)
        if f.name in _VECTOR_COLUMNS or vector_layout(field) is not None:
            kwargs[f.name], entries[f.name] = decode_vectors(col, field)
        elif f.name in PER_SAMPLE:
            inner = _column(col).flatten()  # list<id> per target position
            kwargs[f.name] = _flat(inner, 1)
            kwargs["sample_len"] = _list_lengths(inner)
            entries[f.name] = _list_lengths(col)
        elif pa.types.is_list(field.type):
            kwargs[f.name] = _flat(col, 1)
            entries[f.name] = _list_lengths(col)
        else:
            kwargs[f.name] = _flat(col, 0)
        if f.name in (*PER_TARGET, *PER_SAMPLE) and "target_count" not in kwargs:
            kwargs["target_count"] = entries[f.name]
    _check_layout(entries, kwargs)
    return ShardData(**kwargs)


_VECTOR_COLUMNS = ("hidden", "hidden_layers", "relation", *PER_TARGET)  # stored as vector columns (schemas.shard)


def iter_row_groups(source: Path | bytes | memoryview) -> Iterator[ShardData]:
    """Stream a shard (its path, or its bytes read already) a row group at a time: memory is
    bounded by one row group. Decoded on the caller's thread alone (pyarrow's own pool made one
    loader thread take up to two cores, for no gain in its own rate, and competed with the
    loader's other threads and the training step's)."""
    pf = pq.ParquetFile(source if isinstance(source, (str, Path)) else pa.BufferReader(source))
    start = 0
    for i in range(pf.metadata.num_row_groups):
        try:
            data = from_table(pf.read_row_group(i, use_threads=False))
        except LayoutError as e:
            raise e.shifted(start) from None
        start += data.rows
        yield data


def read_fingerprint(path: Path | pa.NativeFile) -> str | None:
    md = pq.read_schema(path).metadata or {}
    v = md.get(FINGERPRINT_KEY)
    return v.decode() if v else None
