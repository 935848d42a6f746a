"""Streaming a cache into training batches: deterministic shuffling, exact data position, prefetch.

The order of one epoch is a pure function of (seed, epoch, manifest):

1. the listed shards are permuted (seeded by seed, epoch);
2. consecutive groups of `window` shards of that order form windows; the rows of a window are
   permuted together (seeded by seed, epoch, window number);
3. the epoch is the windows' rows one after the other; batches are consecutive runs of it
   (`batch_size` rows, or as many rows as fit in `batch_tokens` padded tokens), never crossing
   an epoch's end.

The data position is (epoch, rows of that epoch's order already consumed): from it the rest of
the stream is recomputed exactly, so a resumed run sees the same batches as an uninterrupted one.

With several ranks (DDP) every rank forms the same global batches and keeps a contiguous share
of each one's rows (`part`): the data position stays global, so a checkpoint resumes on any
number of ranks without skipping or repeating a row. Each rank reads the windows' shards, but
decodes and trains on its own rows only.
Only the current window is in memory (each shard's file read once by `cache.shard_source` into
a reused read buffer, hashed as it is read and checked before use, then parsed a row group
at a time), so memory is flat in the cache size. The window's row groups are kept apart: a batch
is gathered from them straight into its arrays (rows grouped by row group inside the batch), and
its float targets stay in their stored float16 until `Batch.to` widens them on the device.
A background thread (`prefetch.Prefetcher`, in student-train) decodes and pads the next batches
while the model trains on this one; with `workers` > 1, the next window's shards are decoded in
worker processes (`shard_readers`: the GIL would serialise threads) and batches collated in a
pool of threads as well.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from kdpipe.pipeline.cache import open_shard, shard_source
from kdpipe.pipeline import shard_readers, values
from kdpipe.pipeline.errors import CorruptShardError, KdpipeError
from kdpipe.pipeline.modes import TargetMode, TargetSettings, get_mode
from kdpipe.pipeline.modes.base import stored_tensor
from kdpipe.pipeline.offsets import ranges, starts
from kdpipe.pipeline.prefetch import Prefetcher  # noqa: F401  (its old home: imports from here keep working)
from kdpipe.pipeline.shards import LayoutError, ShardData, iter_row_groups
from kdpipe.schemas.checkpoint import Position
from kdpipe.schemas.manifest import Manifest, ShardEntry

_ORDER_SALT, _WINDOW_SALT = 0x5EED0, 0x5EED1


DataPosition = Position  # the loader's older name for it


@dataclass(frozen=True)
class BatchPart:
    """Where one rank's batch sits in the global batch all ranks form (several ranks only)."""

    rows: int  # this rank's rows; 0: the batch holds a stand-in row that must be weighted 0
    global_rows: int
    global_tokens: int  # N of the global batch (non-padding positions)
    global_masked: int  # M of the global batch (masked positions)
    seq_id: np.ndarray  # (global_rows,) the global batch's rows, for samples.jsonl
    view: np.ndarray  # (global_rows,)


@dataclass
class Batch:
    """A padded batch, with the cache's targets at its P target positions (the N non-padding
    positions row-major, or the M masked ones in mlm_index order); fields of other modes are None.
    Float targets come in the dtype the shard stores (float16, log_z float32); `to` widens them
    to the float32 below on the device that trains on them."""

    input_ids: torch.Tensor  # (B, T) int64, padded with pad_id
    attention_mask: torch.Tensor  # (B, T) int64
    mlm_index: torch.Tensor  # (M,) int64 into the N positions
    mlm_labels: torch.Tensor  # (M,) int64
    seq_id: np.ndarray  # (B,)
    view: np.ndarray  # (B,)
    tokens: int  # N
    position: Position  # the data position after this batch
    epoch_progress: float  # epoch + share of it consumed after this batch
    hidden: torch.Tensor | None = None  # (N, d) float32, teacher hidden @ projection
    hidden_layers: torch.Tensor | None = None  # (N, n, d) float32, other layers' states @ their projections
    relation: torch.Tensor | None = None  # (N, n * D) float32, one teacher layer's attention projections
    topk_ids: torch.Tensor | None = None  # (P, k) int64
    topk_logits: torch.Tensor | None = None  # (P, k) float32, raw
    log_z: torch.Tensor | None = None  # (P,) float32, log-partition at the chosen temperature
    sample_ids: torch.Tensor | None = None  # (P, S) int64, padded with count 0
    sample_counts: torch.Tensor | None = None  # (P, S) int64
    teacher_state: torch.Tensor | None = None  # (P, H') float32, the teacher decoder's input
    part: BatchPart | None = None  # with several ranks: this rank's share of the global batch

    def pinned(self) -> "Batch":
        """The tensors in page-locked memory, so `to(cuda)` copies without blocking."""
        return dataclasses.replace(self, **{f: getattr(self, f).pin_memory() for f in _TENSORS
                                            if getattr(self, f) is not None})

    def to(self, device: torch.device) -> "Batch":
        """The batch on `device` (a non-blocking copy from pinned memory), its float targets widened
        to float32 there: they travel in the dtypes the shards store them in."""
        moved = {}
        for f in _TENSORS:
            if (t := getattr(self, f)) is not None:
                t = t if device.type == "cpu" else t.to(device, non_blocking=True)
                moved[f] = t.float() if t.is_floating_point() else t
        return dataclasses.replace(self, **moved)


_TENSORS = ("input_ids", "attention_mask", "mlm_index", "mlm_labels", "hidden", "hidden_layers", "relation", "topk_ids",
            "topk_logits", "log_z", "sample_ids", "sample_counts", "teacher_state")


@dataclass(frozen=True)
class LoaderSpec:
    seed: int
    window: int = 4  # shards shuffled together
    batch_size: int | None = 32  # rows per batch, or
    batch_tokens: int | None = None  # padded tokens per batch (rows x longest row)
    temperature_index: int = 0  # column of log_z
    pad_id: int = 0

    def __post_init__(self) -> None:
        assert (self.batch_size is None) != (self.batch_tokens is None)


class EpochPlan:
    """The order of one epoch's rows, computed a window at a time."""

    def __init__(self, shards: list[ShardEntry], seed: int, epoch: int, window: int) -> None:
        self.seed, self.epoch = seed, epoch
        rng = np.random.default_rng([seed, epoch, _ORDER_SALT])
        order = [shards[i] for i in rng.permutation(len(shards))]
        self.windows: list[list[ShardEntry]] = [order[i:i + window] for i in range(0, len(order), window)]
        sizes = [sum(e.rows for e in w) for w in self.windows]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (W + 1,)
        self.rows = int(self.starts[-1])

    def window_of(self, index: int) -> int:
        return int(np.searchsorted(self.starts, index, side="right") - 1)

    def window_order(self, w: int) -> np.ndarray:
        """(rows of window w,) indices into the window's shards' rows, concatenated in window order."""
        n = int(self.starts[w + 1] - self.starts[w])
        return np.random.default_rng([self.seed, self.epoch, _WINDOW_SALT, w]).permutation(n)


def read_parts(cache_dir: Path, entry: ShardEntry, manifest: Manifest) -> list[ShardData]:
    """One listed shard, hash-checked, its row groups decoded and checked against the manifest,
    kept apart (the loader gathers from them as they are; joining them would copy every column).
    Its file is read once, into a reused read buffer: the bytes hashed are the bytes parsed."""
    buffer = _BUFFERS.take(entry.bytes)
    try:
        path, raw = shard_source(cache_dir, entry, buffer=buffer)
        try:
            parts = list(iter_row_groups(path if raw is None else raw))
        except LayoutError as e:
            raise CorruptShardError(path, str(e)) from None
        finally:
            del raw
        _own(parts, buffer)
    finally:
        _BUFFERS.give(buffer)  # nothing decoded points into it now: the next shard may reuse it
    rows = sum(p.rows for p in parts)
    if rows != entry.rows or not parts:
        raise CorruptShardError(path, f"{rows} rows, manifest says {entry.rows}")
    if what := _layout_problem(parts[0], manifest):  # the row groups share the file's schema
        raise CorruptShardError(path, what)
    lim, start = values.limits_of(manifest), 0
    for data in parts:  # ranges and finiteness, vectorised over a row group (see pipeline/values.py)
        try:
            values.check(data, lim, entry.first_seq, entry.num_seqs)
        except values.ValueProblem as e:
            raise CorruptShardError(path, str(e.shifted(start)), "nothing was trained on it: run `kdpipe cache "
                                    "verify --deep` and re-dump the shard") from None
        start += data.rows
    return parts


class _ReadBuffers:
    """Buffers for shard files, shared by the loader's threads and kept from one loader to the
    next, so reading a shard faults in and zeroes no fresh memory (a buffer per thread did, for
    every new loader's threads: bench/RESULTS.md). Never more of them than threads have read at once."""

    def __init__(self) -> None:
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        """A free buffer of at least `size` bytes (the largest free one, grown if need be)."""
        with self._lock:
            buf = self._free.pop() if self._free else bytearray(0)
        if len(buf) < size:
            buf = bytearray(size)
        return buf

    def give(self, buf: bytearray) -> None:
        with self._lock:
            self._free.append(buf)
            self._free.sort(key=len)


_BUFFERS = _ReadBuffers()


def _own(parts: list[ShardData], buffer: bytearray) -> None:
    """Copy out any decoded column that still points into the read buffer (pyarrow decodes every
    compressed page into memory of its own, so none does today; this keeps a reused buffer safe
    whatever pyarrow does with pages it need not decode)."""
    lo = np.frombuffer(buffer, dtype=np.uint8).ctypes.data
    for data in parts:
        for name in ShardData.__dataclass_fields__:
            a = getattr(data, name)
            if isinstance(a, np.ndarray) and a.size and lo <= a.ctypes.data < lo + len(buffer):
                setattr(data, name, a.copy())


def read_shard(cache_dir: Path, entry: ShardEntry, manifest: Manifest) -> ShardData:
    """One listed shard as `read_parts` reads and checks it, its row groups joined."""
    return concat(read_parts(cache_dir, entry, manifest))


def _layout_problem(data: ShardData, manifest: Manifest) -> str | None:
    """What in a decoded shard's columns contradicts the manifest (missing, extra or of another width)."""
    mode = get_mode(manifest.targets)
    if missing := [c for c in mode.columns if getattr(data, c) is None]:
        return f"no {', '.join(missing)} column for the manifest's {manifest.targets} targets"
    if data.hidden is not None and data.hidden.shape[1] != manifest.hidden_dim:
        return "its hidden width differs from the manifest's"
    if (data.hidden_layers is None) != (not manifest.hidden_layers):
        return ("no hidden_layers column for the manifest's hidden layers" if data.hidden_layers is None
                else "a hidden_layers column the manifest does not list")
    if data.hidden_layers is not None and data.hidden_layers.shape[1] != len(manifest.hidden_layers) * manifest.hidden_dim:
        return "its hidden_layers width differs from the manifest's layers x hidden width"
    if (data.relation is None) != (manifest.relation is None):
        return ("no relation column for the manifest's relation targets" if data.relation is None
                else "a relation column the manifest does not list")
    if data.relation is not None and data.relation.shape[1] != manifest.relation.width:
        return "its relation width differs from the manifest's parts x width"
    return mode.shard_problem(data, TargetSettings.of_manifest(manifest))


def concat(parts: list[ShardData]) -> ShardData:
    if len(parts) == 1:
        return parts[0]
    names = ShardData.__dataclass_fields__
    return ShardData(**{n: None if getattr(parts[0], n) is None else np.concatenate([getattr(p, n) for p in parts])
                        for n in names})


class _Part:
    """One decoded row group of a window's shards, with its rows' offsets into its flat arrays."""

    def __init__(self, data: ShardData) -> None:
        self.data = data
        self.off = data.offsets()  # (R + 1,) per token
        self.moff = data.mlm_offsets()  # (R + 1,) per masked position
        self.toff = data.target_offsets()  # (R + 1,) per target position, or None
        self.soff = data.sample_offsets()  # (P + 1,) per draw, or None


class _Window:
    """The decoded row groups of one window's shards, kept apart, with the per-row fields batching
    reads row by row joined (R,), and the cache's target mode (which names the columns it gathers)."""

    def __init__(self, parts: list[ShardData], mode: TargetMode) -> None:
        self.parts, self.mode = [_Part(p) for p in parts], mode
        self.bases = starts(np.array([p.rows for p in parts], dtype=np.int64))  # (G + 1,) first row of each
        self.length = np.concatenate([p.length for p in parts]).astype(np.int64)  # (R,)
        self.mlm_count = np.concatenate([p.mlm_count for p in parts]).astype(np.int64)  # (R,)
        self.seq_id = np.concatenate([p.seq_id for p in parts])  # (R,)
        self.view = np.concatenate([p.view for p in parts])  # (R,)


def _gather_order(rows: list[tuple[_Window, int]]) -> list[tuple[_Window, int]]:
    """A batch's rows (a run of the epoch's order) grouped by the row group each lies in, stably
    (a batch that spans two windows keeps the first one's rows first): every column of the batch
    is then gathered with one take per row group, straight into the batch. The batch holds the
    same rows as the epoch's order, in this order for one rank or several (whose shares are
    contiguous runs of it)."""
    keys, run, prev = [], -1, None
    for win, r in rows:
        if win is not prev:
            run, prev = run + 1, win
        keys.append((run, int(np.searchsorted(win.bases, r, side="right")) - 1))
    return [rows[i] for i in sorted(range(len(rows)), key=keys.__getitem__)]


def _groups(rows: list[tuple[_Window, int]]) -> list[tuple[_Part, np.ndarray]]:
    """A batch's (window, row) as (row group, its rows there), in batch order: each run of rows of
    one row group (one run per row group for rows in `_gather_order`)."""
    out = []
    i = 0
    while i < len(rows):
        win = rows[i][0]
        j = i
        while j < len(rows) and rows[j][0] is win:
            j += 1
        r = np.array([x[1] for x in rows[i:j]], dtype=np.int64)
        g = np.searchsorted(win.bases, r, side="right") - 1  # (rows,) row group of each
        for run in np.split(np.arange(len(r)), np.flatnonzero(np.diff(g)) + 1):
            k = int(g[run[0]])
            out.append((win.parts[k], r[run] - win.bases[k]))
        i = j
    return out


def _take(sources: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The rows `index` of each `array`, one source after the other, in one array: each source is
    taken straight into its slice of the result (np.take: a row copy, no temporary; the indices
    come from the shard's own offsets, so they are in range)."""
    if len(sources) == 1:
        array, index = sources[0]
        return np.take(array, index, axis=0)
    first = sources[0][0]
    out = np.empty((sum(len(ix) for _, ix in sources), *first.shape[1:]), dtype=first.dtype)
    at = 0
    for array, index in sources:  # mode "clip": with "raise", numpy buffers `out` (a second copy)
        np.take(array, index, axis=0, out=out[at:at + len(index)], mode="clip")
        at += len(index)
    return out


def collate(rows: list[tuple[_Window, int]], spec: LoaderSpec, position: Position, progress: float
            ) -> Batch:
    """Pad a list of (window, row) into a Batch; per-position arrays keep row-major order."""
    mode = rows[0][0].mode
    sources: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}  # column -> (array, rows of it) per row group
    targets: list[str] = []  # the mode's columns
    for part, r in _groups(rows):
        d = part.data
        tok = ranges(part.off[r], d.length[r].astype(np.int64))
        msk = ranges(part.moff[r], d.mlm_count[r].astype(np.int64))
        cols = {"length": (d.length, r), "mlm_count": (d.mlm_count, r), "seq_id": (d.seq_id, r),
                "view": (d.view, r), "input_ids": (d.input_ids, tok), "mlm_positions": (d.mlm_positions, msk),
                "mlm_labels": (d.mlm_labels, msk)}
        for name in ("hidden", "hidden_layers", "relation"):
            if getattr(d, name) is not None:
                cols[name] = (getattr(d, name), tok)
        if part.toff is not None:
            tgt = ranges(part.toff[r], d.target_count[r].astype(np.int64))
            mine = mode.takes(d, tgt, part.soff, spec.temperature_index)
            targets = list(mine)
            cols.update(mine)
        for name, src in cols.items():
            sources.setdefault(name, []).append(src)
    got = {name: _take(src) for name, src in sources.items()}
    length, mcount = got["length"].astype(np.int64), got["mlm_count"].astype(np.int64)
    bsz, width = len(length), int(length.max())
    ids = np.full((bsz, width), spec.pad_id, dtype=np.int64)  # (B, T)
    att = (np.arange(width)[None, :] < length[:, None])  # (B, T)
    ids[att] = got["input_ids"]
    row_start = np.concatenate([[0], np.cumsum(length)[:-1]])  # (B,) first position of each row
    mlm_index = np.repeat(row_start, mcount) + got["mlm_positions"].astype(np.int64)  # (M,)
    t = torch.from_numpy
    hidden = stored_tensor(got["hidden"]) if "hidden" in got else None  # (N, d)
    layers = None
    if "hidden_layers" in got:  # (N, n * d) -> (N, n, d): d is the hidden column's width
        flat = stored_tensor(got["hidden_layers"])
        layers = flat.reshape(len(flat), -1, hidden.shape[1])
    return Batch(
        input_ids=t(ids), attention_mask=t(att.astype(np.int64)),
        mlm_index=t(mlm_index), mlm_labels=t(got["mlm_labels"].astype(np.int64)),
        seq_id=got["seq_id"], view=got["view"], tokens=int(length.sum()), position=position,
        epoch_progress=progress, hidden=hidden, hidden_layers=layers,
        relation=stored_tensor(got["relation"]) if "relation" in got else None,  # (N, n * D)
        **mode.batch_tensors({name: got[name] for name in targets}),
    )


class _ThreadReaders:
    """`read_parts` in a pool of this process's threads (where worker processes cannot be used)."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self.pool = pool

    def submit(self, cache_dir: Path, entry: ShardEntry, manifest: Manifest) -> "Future[list[ShardData]]":
        return self.pool.submit(read_parts, cache_dir, entry, manifest)


Readers = Any  # _ThreadReaders or shard_readers.ProcessReaders: submit(cache_dir, entry, manifest)


def _read_window(cache_dir: Path, manifest: Manifest, window: list[ShardEntry], mode: TargetMode,
                 readers: Readers | None) -> "Callable[[], _Window]":
    """A window's shards decoded (hash check, Parquet decode, value checks): with readers, started
    there now, one shard a worker; without, when the window is taken. Taking it (calling what is
    returned) joins them in the caller's thread."""
    if readers is None:
        return lambda: _Window([p for e in window for p in read_parts(cache_dir, e, manifest)], mode)
    parts = [readers.submit(cache_dir, e, manifest) for e in window]
    return lambda: _Window([p for f in parts for p in f.result()], mode)


def _row_stream(cache_dir: Path, manifest: Manifest, spec: LoaderSpec, start: Position,
                epochs: int | None, readers: Readers | None = None
                ) -> Iterator[tuple[_Window, int, int, int, EpochPlan]]:
    """(window, row in window, epoch, index of the row in the epoch, plan) from `start` on. With
    readers, the next window of the epoch is decoded while this one's rows are handed out."""
    epoch, index = start.epoch, start.index
    # what a reader needs of the manifest, whatever the cache's size (sent to each reader process)
    told = manifest if readers is None else manifest.model_copy(update={"shards": []})
    mode = get_mode(manifest.targets)
    while epochs is None or epoch < epochs:
        plan = EpochPlan(manifest.shards, spec.seed, epoch, spec.window)
        if plan.rows == 0:
            raise KdpipeError("the cache lists no rows to train on")
        ahead = None
        while index < plan.rows:
            w = plan.window_of(index)
            take = ahead if ahead is not None else _read_window(cache_dir, told, plan.windows[w], mode, readers)
            win, ahead = take(), None
            if readers is not None and w + 1 < len(plan.windows):
                ahead = _read_window(cache_dir, told, plan.windows[w + 1], mode, readers)
            order = plan.window_order(w)
            base = int(plan.starts[w])
            for i in range(index - base, len(order)):
                yield win, int(order[i]), epoch, base + i, plan
            index = int(plan.starts[w + 1])
            del win
        epoch, index = epoch + 1, 0


def _full_before(count: int, longest: int, length: int, spec: LoaderSpec) -> bool:
    """Whether a batch of `count` rows must be closed before a row of `length` joins it."""
    return count > 0 and spec.batch_tokens is not None and (count + 1) * max(longest, length) > spec.batch_tokens


def _full_after(count: int, spec: LoaderSpec) -> bool:
    return spec.batch_size is not None and count == spec.batch_size


def iter_batches(cache_dir: Path, manifest: Manifest, spec: LoaderSpec, start: Position,
                 epochs: int | None = None, part: tuple[int, int] = (0, 1), workers: int = 1,
                 pin_memory: bool = False) -> Iterator[Batch]:
    """Batches from `start` to the end of epoch `epochs - 1` (forever when None), in order.
    part = (rank, world): the share of every global batch this rank trains on (see the top).
    workers > 1: the next window's shards are read, decoded and checked by that many worker
    processes (`shard_readers`; threads where they cannot be used) while this window's batches
    are collated in as many threads, at most 2 x workers batches ahead; the batches are the same.
    pin_memory: batches in page-locked memory, for non-blocking copies to a CUDA device."""
    if workers < 1:
        raise KdpipeError(f"loader workers must be at least 1, not {workers}")
    if workers == 1:
        yield from _batches(cache_dir, manifest, spec, start, epochs, part, None, pin_memory)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="kdpipe-loader") as pool:
        why = shard_readers.why_not(Path(cache_dir), manifest, spec.window)
        if why is None:
            readers: Readers = shard_readers.readers(workers)
        else:
            shard_readers.note_threads(why, workers)
            readers = _ThreadReaders(pool)
        ahead: deque[Future] = deque()
        try:
            for job in _batches(cache_dir, manifest, spec, start, epochs, part, readers, pin_memory):
                ahead.append(pool.submit(job))
                while len(ahead) > 2 * workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            for f in ahead:
                f.cancel()


def _batches(cache_dir: Path, manifest: Manifest, spec: LoaderSpec, start: Position, epochs: int | None,
             part: tuple[int, int], readers: Readers | None, pin_memory: bool) -> Iterator:
    """The batches of `iter_batches`, each as it is (no readers) or, with readers decoding the
    windows, as a job that makes it."""
    rows: list[tuple[_Window, int]] = []
    longest = 0
    cur = (start.epoch, start.index)  # (epoch, index after the last row taken)
    plan_rows = 1
    rank, world = part

    def emit() -> Any:
        ep, idx = cur
        pos = Position(ep + 1, 0) if idx >= plan_rows else Position(ep, idx)
        taken, progress = _gather_order(rows), ep + idx / plan_rows

        def make() -> Batch:
            if world == 1:
                b = collate(taken, spec, pos, progress)
            else:
                b = _share(taken, rank, world, spec, pos, progress)
            return b.pinned() if pin_memory else b

        return make if readers is not None else make()

    for win, r, epoch, index, plan in _row_stream(Path(cache_dir), manifest, spec, start, epochs, readers):
        length = int(win.length[r])
        if rows and (cur[0] != epoch or _full_before(len(rows), longest, length, spec)):
            yield emit()  # full, or the epoch ended (a batch never crosses an epoch's end)
            rows, longest = [], 0
        rows.append((win, r))
        longest = max(longest, length)
        cur, plan_rows = (epoch, index + 1), plan.rows
        if _full_after(len(rows), spec):
            yield emit()
            rows, longest = [], 0
    if rows:
        yield emit()


def _share(rows: list[tuple[_Window, int]], rank: int, world: int, spec: LoaderSpec, position: Position,
           progress: float) -> Batch:
    """This rank's contiguous share of a global batch, with the global counts the loss weights
    need. A share with no rows (a last batch smaller than the world) holds the batch's first row
    as a stand-in, so every rank still runs forward and backward; its weight is 0."""
    n = len(rows)
    lo, hi = rank * n // world, (rank + 1) * n // world
    batch = collate(rows[lo:hi] or rows[:1], spec, position, progress)
    batch.part = BatchPart(
        rows=hi - lo, global_rows=n,
        global_tokens=sum(int(w.length[r]) for w, r in rows),
        global_masked=sum(int(w.mlm_count[r]) for w, r in rows),
        seq_id=np.array([w.seq_id[r] for w, r in rows]), view=np.array([w.view[r] for w, r in rows]))
    return batch


def batches_per_epoch(cache_dir: Path, manifest: Manifest, spec: LoaderSpec, epochs: int) -> list[int]:
    """How many batches each of the first `epochs` epochs holds (for the learning-rate schedule).
    With batch_tokens this reads the `length` column of every shard once (hash-checked)."""
    rows = sum(e.rows for e in manifest.shards)
    if spec.batch_size is not None:
        return [-(-rows // spec.batch_size)] * epochs
    lengths = {e.path: _lengths(cache_dir, e) for e in manifest.shards}  # 8 bytes a row
    out = []
    for epoch in range(epochs):
        plan = EpochPlan(manifest.shards, spec.seed, epoch, spec.window)
        n = count = longest = 0
        for w, window in enumerate(plan.windows):
            lens = np.concatenate([lengths[e.path] for e in window])
            for r in plan.window_order(w):
                length = int(lens[r])
                if _full_before(count, longest, length, spec):
                    n, count, longest = n + 1, 0, 0
                count, longest = count + 1, max(longest, length)
        out.append(n + (1 if count else 0))
    return out


def _lengths(cache_dir: Path, entry: ShardEntry) -> np.ndarray:
    """(rows,) lengths of a listed shard (hash-checked), from its `length` column only."""
    path = open_shard(cache_dir, entry)
    return pq.read_table(path, columns=["length"]).column("length").to_numpy().astype(np.int64)
