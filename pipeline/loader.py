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
Only the current window is in memory (each shard's file read once by `cache.shard_source`, its
hash checked before use, then parsed a row group at a time), so memory is flat in the cache size.
A background thread (`prefetch.Prefetcher`, in student-train) decodes and pads the next batches
while the model trains on this one; with `workers` > 1, the next window is decoded and batches
collated in a pool of threads as well.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from kdpipe.pipeline.cache import open_shard, shard_source
from kdpipe.pipeline import values
from kdpipe.pipeline.errors import CorruptShardError, KdpipeError
from kdpipe.pipeline.modes import TargetMode, TargetSettings, get_mode
from kdpipe.pipeline.modes.base import float_tensor
from kdpipe.pipeline.offsets import ranges
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
    positions row-major, or the M masked ones in mlm_index order); fields of other modes are None."""

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
        if device.type == "cpu":
            return self
        moved = {f: getattr(self, f).to(device, non_blocking=True) for f in _TENSORS
                 if getattr(self, f) is not None}
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


def read_shard(cache_dir: Path, entry: ShardEntry, manifest: Manifest) -> ShardData:
    """One listed shard, hash-checked, read a row group at a time, checked against the manifest.
    Its file is read once: the bytes hashed are the bytes parsed."""
    path, raw = shard_source(cache_dir, entry)
    try:
        data = concat(list(iter_row_groups(path if raw is None else raw)))
    except LayoutError as e:
        raise CorruptShardError(path, str(e)) from None
    mode = get_mode(manifest.targets)
    what = None
    if data.rows != entry.rows:
        what = f"{data.rows} rows, manifest says {entry.rows}"
    elif missing := [c for c in mode.columns if getattr(data, c) is None]:
        what = f"no {', '.join(missing)} column for the manifest's {manifest.targets} targets"
    elif data.hidden is not None and data.hidden.shape[1] != manifest.hidden_dim:
        what = "its hidden width differs from the manifest's"
    elif (data.hidden_layers is None) != (not manifest.hidden_layers):
        what = ("no hidden_layers column for the manifest's hidden layers" if data.hidden_layers is None
                else "a hidden_layers column the manifest does not list")
    elif data.hidden_layers is not None and data.hidden_layers.shape[1] != len(manifest.hidden_layers) * manifest.hidden_dim:
        what = "its hidden_layers width differs from the manifest's layers x hidden width"
    elif (data.relation is None) != (manifest.relation is None):
        what = ("no relation column for the manifest's relation targets" if data.relation is None
                else "a relation column the manifest does not list")
    elif data.relation is not None and data.relation.shape[1] != manifest.relation.width:
        what = "its relation width differs from the manifest's parts x width"
    else:
        what = mode.shard_problem(data, TargetSettings.of_manifest(manifest))
    if what:
        raise CorruptShardError(path, what)
    try:  # ranges and finiteness, vectorised over the shard (see pipeline/values.py)
        values.check(data, values.limits_of(manifest), entry.first_seq, entry.num_seqs)
    except values.ValueProblem as e:
        raise CorruptShardError(path, str(e), "nothing was trained on it: run `kdpipe cache verify --deep` "
                                "and re-dump the shard") from None
    return data


def concat(parts: list[ShardData]) -> ShardData:
    if len(parts) == 1:
        return parts[0]
    names = ShardData.__dataclass_fields__
    return ShardData(**{n: None if getattr(parts[0], n) is None else np.concatenate([getattr(p, n) for p in parts])
                        for n in names})


class _Window:
    """The decoded rows of one window, with per-row offsets into the per-token arrays, and the
    cache's target mode (which gathers its own columns)."""

    def __init__(self, data: ShardData, mode: TargetMode) -> None:
        self.data, self.mode = data, mode
        self.off = data.offsets()  # (R + 1,)
        self.moff = data.mlm_offsets()  # (R + 1,)
        self.toff = data.target_offsets()  # (R + 1,) or None
        self.soff = data.sample_offsets()  # (P + 1,) or None


def collate(rows: list[tuple[_Window, int]], spec: LoaderSpec, position: Position, progress: float
            ) -> Batch:
    """Pad a list of (window, row) into a Batch; per-position arrays keep row-major order."""
    pieces: dict[str, list[np.ndarray]] = {}
    targets: dict[str, list[np.ndarray]] = {}  # the mode's columns
    lengths, mcounts, seq, view = [], [], [], []
    mode = rows[0][0].mode

    def add(name: str, values: np.ndarray | None) -> None:
        if values is not None:
            pieces.setdefault(name, []).append(values)

    # group consecutive rows of the same window so slicing is vectorised per window
    i = 0
    while i < len(rows):
        win = rows[i][0]
        j = i
        while j < len(rows) and rows[j][0] is win:
            j += 1
        r = np.array([x[1] for x in rows[i:j]], dtype=np.int64)
        d = win.data
        ln, mc = d.length[r].astype(np.int64), d.mlm_count[r].astype(np.int64)
        tok = ranges(win.off[r], ln)
        msk = ranges(win.moff[r], mc)
        add("ids", d.input_ids[tok])
        add("mpos", d.mlm_positions[msk])
        add("mlab", d.mlm_labels[msk])
        add("hidden", None if d.hidden is None else d.hidden[tok])
        add("hidden_layers", None if d.hidden_layers is None else d.hidden_layers[tok])
        add("relation", None if d.relation is None else d.relation[tok])
        if win.toff is not None:
            tgt = ranges(win.toff[r], d.target_count[r].astype(np.int64))
            for name, v in mode.gather(d, tgt, win.soff, spec.temperature_index).items():
                targets.setdefault(name, []).append(v)
        lengths.append(ln)
        mcounts.append(mc)
        seq.append(d.seq_id[r])
        view.append(d.view[r])
        i = j
    cat = _joined
    length, mcount = cat(lengths), cat(mcounts)
    bsz, width = len(length), int(length.max())
    ids = np.full((bsz, width), spec.pad_id, dtype=np.int64)  # (B, T)
    att = (np.arange(width)[None, :] < length[:, None])  # (B, T)
    ids[att] = cat(pieces["ids"])
    row_start = np.concatenate([[0], np.cumsum(length)[:-1]])  # (B,) first position of each row
    mlm_index = np.repeat(row_start, mcount) + cat(pieces["mpos"]).astype(np.int64)  # (M,)
    t = torch.from_numpy
    hidden = float_tensor(cat(pieces["hidden"])) if "hidden" in pieces else None  # (N, d)
    layers = None
    if "hidden_layers" in pieces:  # (N, n * d) -> (N, n, d): d is the hidden column's width
        flat = float_tensor(cat(pieces["hidden_layers"]))
        layers = flat.reshape(len(flat), -1, hidden.shape[1])
    return Batch(
        input_ids=t(ids), attention_mask=t(att.astype(np.int64)),
        mlm_index=t(mlm_index), mlm_labels=t(cat(pieces["mlab"]).astype(np.int64)),
        seq_id=cat(seq), view=cat(view), tokens=int(length.sum()), position=position,
        epoch_progress=progress, hidden=hidden, hidden_layers=layers,
        relation=float_tensor(cat(pieces["relation"])) if "relation" in pieces else None,  # (N, n * D)
        **mode.batch_tensors({name: cat(v) for name, v in targets.items()}),
    )


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """The parts one after the other; a batch's rows usually come from one window, so one part,
    used as it is (concatenating it would copy it once more)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _read_window(cache_dir: Path, manifest: Manifest, window: list[ShardEntry], mode: TargetMode,
                 pool: ThreadPoolExecutor | None) -> "Future[_Window] | _Window":
    """A window's shards decoded (hash check, Parquet decode) in the pool, one shard a thread,
    or here and now without one."""
    if pool is None:
        return _Window(concat([read_shard(cache_dir, e, manifest) for e in window]), mode)
    parts = [pool.submit(read_shard, cache_dir, e, manifest) for e in window]
    return pool.submit(lambda: _Window(concat([f.result() for f in parts]), mode))


def _row_stream(cache_dir: Path, manifest: Manifest, spec: LoaderSpec, start: Position,
                epochs: int | None, pool: ThreadPoolExecutor | None = None
                ) -> Iterator[tuple[_Window, int, int, int, EpochPlan]]:
    """(window, row in window, epoch, index of the row in the epoch, plan) from `start` on. With a
    pool, the next window of the epoch is decoded while this one's rows are handed out."""
    epoch, index = start.epoch, start.index
    mode = get_mode(manifest.targets)
    while epochs is None or epoch < epochs:
        plan = EpochPlan(manifest.shards, spec.seed, epoch, spec.window)
        if plan.rows == 0:
            raise KdpipeError("the cache lists no rows to train on")
        ahead = None
        while index < plan.rows:
            w = plan.window_of(index)
            win = ahead if ahead is not None else _read_window(cache_dir, manifest, plan.windows[w], mode, pool)
            ahead = None
            if pool is not None:
                win = win.result()
                if w + 1 < len(plan.windows):
                    ahead = _read_window(cache_dir, manifest, plan.windows[w + 1], mode, pool)
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
    workers > 1: the next window's shards are decoded and the next batches collated in that many
    threads (pyarrow, hashlib and numpy's copies release the GIL), at most 2 x workers batches
    ahead; the batches are the same. pin_memory: batches in page-locked memory, for
    non-blocking copies to a CUDA device."""
    if workers < 1:
        raise KdpipeError(f"loader workers must be at least 1, not {workers}")
    if workers == 1:
        yield from _batches(cache_dir, manifest, spec, start, epochs, part, None, pin_memory)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="kdpipe-loader") as pool:
        ahead: deque[Future] = deque()
        try:
            for job in _batches(cache_dir, manifest, spec, start, epochs, part, pool, pin_memory):
                ahead.append(pool.submit(job))
                while len(ahead) > 2 * workers:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            for f in ahead:
                f.cancel()


def _batches(cache_dir: Path, manifest: Manifest, spec: LoaderSpec, start: Position, epochs: int | None,
             part: tuple[int, int], pool: ThreadPoolExecutor | None, pin_memory: bool) -> Iterator:
    """The batches of `iter_batches`, each as it is (no pool) or as a job that makes it (pool)."""
    rows: list[tuple[_Window, int]] = []
    longest = 0
    cur = (start.epoch, start.index)  # (epoch, index after the last row taken)
    plan_rows = 1
    rank, world = part

    def emit() -> Any:
        ep, idx = cur
        pos = Position(ep + 1, 0) if idx >= plan_rows else Position(ep, idx)
        taken, progress = rows, ep + idx / plan_rows

        def make() -> Batch:
            if world == 1:
                b = collate(taken, spec, pos, progress)
            else:
                b = _share(taken, rank, world, spec, pos, progress)
            return b.pinned() if pin_memory else b

        return make if pool is not None else make()

    for win, r, epoch, index, plan in _row_stream(Path(cache_dir), manifest, spec, start, epochs, pool):
        length = int(win.data.length[r])
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
        global_tokens=sum(int(w.data.length[r]) for w, r in rows),
        global_masked=sum(int(w.data.mlm_count[r]) for w, r in rows),
        seq_id=np.array([w.data.seq_id[r] for w, r in rows]), view=np.array([w.data.view[r] for w, r in rows]))
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
