"""Benchmark: the host work around the teacher and the student, against the floor of its bytes.

    python bench/host_pipeline.py                  # 8 shards of 256 x 128 tokens, ~1-2 min on 2 cores
    python bench/host_pipeline.py --quick          # smoke run
    python bench/host_pipeline.py --write-results  # also write the tables into bench/RESULTS.md

Run by hand, never by the tests. On a GPU the teacher and the student are fast, so what sets the
pace is everything around them; this measures that on any machine, with no model at all:

- dump host path: `stages.teacher_dump.dump_shards` (masking, padding, gathering the batches'
  outputs into the shard's columns in their stored dtypes, the value checks, the Arrow table,
  zstd Parquet encoding, SHA-256, the atomic write), fed by a synthetic teacher that returns
  outputs of the right shapes and dtypes at no cost, with 1..N writer workers.
- where the dump's time goes: the same shard loop with a pool that encodes nothing (the main
  thread's own work per shard, m) and the writer's `encode` alone on those shards (w), as one
  writer splits the work and as several do (they also gather and check). With one writer the two
  threads overlap; N writers on C cores take at least max(m, w / N, (m + w) / C, io) per shard,
  where io is writing the shard's file (`fsutil.atomic_write_bytes` of its bytes: one I/O thread
  writes the files in order), so the speed-up of N writers over one is bounded by one writer's
  max(m, w, (m + w) / C, io) over that: printed next to the measured scaling.
- disk floor: io alone, as tokens/s: the dump's ceiling on this disk whatever the cores (on the
  2-core VMs seen, 2.8-5.5M tokens/s, 3-4x what one writer reaches: not what holds two writers back).
- dump floor: zstd at the dump's level over the same shards' raw Arrow buffers, plus SHA-256 of
  what that produced: the work no dump avoids, on one core (and N cores in N processes).
- loader: `loader.iter_batches` (hash check, Parquet decode, shuffle, collation) over the
  shards just written, no model, with 1..N decode workers (from 2 on, worker processes that
  hand the decoded shards back through shared memory; `pipeline/shard_readers.py`).
- loader floor: SHA-256 of each shard file plus zstd decompression of the compressed buffers.

Every configuration is timed in rounds interleaved with the floor, so machine load that comes and
goes hits both alike; the ratio of the two is what counts on a shared machine.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
from results import RESULTS, machine, write_section  # bench/results.py (bench/ is on sys.path)

V = 30522
PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
TEMPERATURES = (1.0, 2.0, 4.0)
SECTION = "## host pipeline (issue 17)"


class SyntheticTeacher:
    """`TeacherRunner.run`'s contract (topk mode) at no cost: slices of precomputed outputs.

    The pool is several shards long and read at a rotating offset, so zstd never sees a repeat
    inside its window (a repeat would compress to nothing and flatter the dump)."""

    def __init__(self, tokens: int, k: int, dim: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.n = tokens
        self.hidden = rng.standard_normal((tokens, dim), dtype=np.float32)  # (N, d)
        self.topk_ids = rng.integers(1000, V, size=(tokens, k)).astype(np.int64)  # (N, k)
        self.topk_logits = -np.sort(-rng.standard_normal((tokens, k), dtype=np.float32) * 3, axis=1)
        self.log_z = (rng.standard_normal((tokens, len(TEMPERATURES))) + 10).astype(np.float32)
        self.at = 0

    def _take(self, a: np.ndarray, n: int) -> np.ndarray:
        lo = self.at % (self.n - n)
        return a[lo:lo + n]

    def run(self, input_ids, attention_mask, target_mask=None, uniforms=None):  # torch tensors
        from kdpipe.pipeline.teacher import TeacherOutputs

        n = int(attention_mask.sum())
        p = n if target_mask is None else int(target_mask.sum())
        out = TeacherOutputs(self._take(self.hidden, n), topk_ids=self._take(self.topk_ids, p),
                             topk_logits=self._take(self.topk_logits, p), log_z=self._take(self.log_z, p))
        self.at += 7919 + n
        return out


def sequences(n: int, seq_len: int, seed: int = 1) -> list[np.ndarray]:
    """Full-length packed sequences, [CLS] ids [SEP] with a document boundary inside."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        body = rng.integers(1000, V, size=seq_len - 2)
        body[rng.integers(0, seq_len - 2)] = SEP
        out.append(np.concatenate([[CLS], body, [SEP]]).astype(np.int64))
    return out


def row_spec(batch: int):
    from kdpipe.pipeline.dump import RowSpec
    from kdpipe.pipeline.masking import MaskingSpec, Vocabulary

    vocab = Vocabulary(V, MASK, np.array([PAD, UNK, CLS, SEP, MASK], dtype=np.int64))
    return RowSpec(MaskingSpec(), 1, vocab, vocab.random_pool(), None, "topk", "all", 0, batch, PAD)


# ----------------------------------------------------------------------------------- the floors

def raw_buffers(path: Path) -> list[pa.Buffer]:
    """The raw Arrow buffers of a shard's columns (what the dump encodes)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path).combine_chunks()
    return [b for col in table.columns for chunk in col.chunks for b in chunk.buffers() if b is not None]


def dump_floor(buffers: list[pa.Buffer], level: int) -> None:
    codec = pa.Codec("zstd", compression_level=level)
    h = hashlib.sha256()
    for b in buffers:
        h.update(codec.compress(b))
    h.hexdigest()


def loader_floor(path: Path, compressed: list[pa.Buffer], sizes: list[int]) -> None:
    codec = pa.Codec("zstd")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    for c, n in zip(compressed, sizes):
        codec.decompress(c, decompressed_size=n)


def time_file_writes(paths: list[Path], out: Path) -> float:
    """Seconds to write the shards' bytes afresh, one file at a time as the dump's I/O thread does
    (temporary name, fsync, rename): the disk's floor, which no number of writers raises."""
    from kdpipe.pipeline.fsutil import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    bufs = [pa.py_buffer(p.read_bytes()) for p in paths]
    t0 = time.perf_counter()
    for i, b in enumerate(bufs):
        atomic_write_bytes(out / f"copy-{i}.parquet", b)
    took = time.perf_counter() - t0
    shutil.rmtree(out)
    return took


def _floor_job(args: tuple) -> float:
    """One process's share of the floor: `reps` passes over the shards, seconds taken."""
    kind, paths, level, reps = args
    bufs = [raw_buffers(p) for p in paths]
    codec = pa.Codec("zstd", compression_level=level)
    comp = [[codec.compress(b) for b in bs] for bs in bufs]
    t0 = time.perf_counter()
    for _ in range(reps):
        for p, bs, cs in zip(paths, bufs, comp):
            if kind == "dump":
                dump_floor(bs, level)
            else:
                loader_floor(p, cs, [b.size for b in bs])
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------- the paths

def writers(n: int, k: int, dim: int, level: int):
    """A started pool of n shard writers (started once per stage run, so not timed)."""
    from kdpipe.pipeline.writers import ShardWriters
    from kdpipe.schemas.shard import shard_schema

    return ShardWriters(n, shard_schema(V, k=k, n_temperatures=len(TEMPERATURES), hidden_dim=dim), "0" * 64,
                        level)


def dump_path(seqs: list[np.ndarray], shard_size: int, batch: int, pool, out: Path,
              teacher: SyntheticTeacher) -> float:
    """Seconds for the stage's shard loop over `seqs`, every shard written and hashed."""
    from kdpipe.stages.teacher_dump import dump_shards

    shutil.rmtree(out, ignore_errors=True)
    (out / "shards").mkdir(parents=True)
    t0 = time.perf_counter()
    dump_shards(row_spec(batch), teacher, shard_chunks(seqs, shard_size), shard_size, out, pool,
                check=value_check(pool.schema, max(len(x) for x in seqs), shard_size))
    return time.perf_counter() - t0


class NullWriters:
    """`ShardWriters`' interface, encoding nothing: the shard loop with it times the main thread's
    own work per shard; the shards it is handed are kept (the first `keep`) to time the writer.
    gathers: as several writers do (the writer gathers and checks; the caller masks here, which
    masking processes do with several writers, so the main thread's figure is an upper bound)."""

    maskers = 0

    def __init__(self, schema: pa.Schema, keep: int, gathers: bool) -> None:
        self.schema, self.keep, self.gathers, self.kept = schema, keep, gathers, []

    def mask(self, *args) -> None:
        return None  # the caller masks, as with one writer

    def submit(self, path: Path, data) -> None:
        if len(self.kept) < self.keep:
            self.kept.append(data)

    def drain(self) -> None:
        pass


def writer_alone(shards: list, schema: pa.Schema, level: int) -> float:
    """Seconds for `writers.encode` of each shard (or of the function making it) in turn, on this
    thread: a writer's work."""
    from kdpipe.pipeline.writers import encode

    t0 = time.perf_counter()
    for d in shards:
        encode(d, schema, "0" * 64, level)
    return time.perf_counter() - t0


def bound(one: tuple[float, float], many: tuple[float, float], n: int, cores: int, io: float) -> float:
    """The most n writers can gain over one on `cores` cores, from the main thread's work m and a
    writer's w per shard, (m, w) with one writer and with several (who gather and check), and the
    seconds `io` the one I/O thread takes to write a shard's file."""
    per_shard = lambda m, w, k: max(m, w / k, (m + w) / cores, io)  # noqa: E731
    return per_shard(*one, 1) / per_shard(*(one if n == 1 else many), n)


def value_check(schema: pa.Schema, seq_len: int, shard_size: int):
    """The stage's check of a shard's values before it is stored (pipeline/values.py)."""
    from kdpipe.pipeline import values

    lim = values.Limits(V, seq_len, 1, "all", TEMPERATURES, None, values.float_limits(schema))
    return lambda index, n, data: values.check(data, lim, index * shard_size, n)


def shard_chunks(seqs: list[np.ndarray], shard_size: int):
    """(index, sequences) of every shard, as the stage's tokenising thread hands them over."""
    return ((i, seqs[lo:lo + shard_size]) for i, lo in enumerate(range(0, len(seqs), shard_size)))


def manifest_of(out: Path, shard_size: int, dim: int, k: int, seq_len: int):
    """A manifest listing the shards just written (only what the loader reads from it)."""
    import pyarrow.parquet as pq

    from kdpipe.pipeline.fsutil import sha256_file
    from kdpipe.schemas.manifest import Manifest, ShardEntry

    entries = []
    for i, p in enumerate(sorted((out / "shards").glob("shard-*.parquet"))):
        md = pq.ParquetFile(p).metadata
        entries.append(ShardEntry.model_construct(
            path=p.relative_to(out).as_posix(), index=i, first_seq=i * shard_size, num_seqs=md.num_rows,
            rows=md.num_rows, tokens=0, bytes=p.stat().st_size, sha256=sha256_file(p)))
    return Manifest.model_construct(shards=entries, targets="topk", hidden_dim=dim, top_k=k,
                                    temperatures=list(TEMPERATURES), vocab_size=V, seq_len=seq_len,
                                    target_positions="all", samples=None, state_dim=None,
                                    fingerprint={"masking": {"views": 1}})


def loader_path(out: Path, manifest, batch: int, workers: int) -> tuple[float, int]:
    """Seconds and tokens for one epoch of batches, every shard's hash checked afresh."""
    from kdpipe.pipeline import cache
    from kdpipe.pipeline.loader import DataPosition, LoaderSpec, iter_batches

    cache._verified.clear()
    spec = LoaderSpec(seed=0, window=2, batch_size=batch, pad_id=PAD)
    t0 = time.perf_counter()
    tokens = 0
    for b in iter_batches(out, manifest, spec, DataPosition(0, 0), epochs=1, workers=workers):
        tokens += b.tokens
    return time.perf_counter() - t0, tokens


# ------------------------------------------------------------------------------------- measuring

def whole(low: int, high: int | None = None, what: str = "a whole number"):
    """An argparse type: a whole number from `low` (to `high`)."""
    def parse(text: str) -> int:
        if not text.strip().isdigit() or int(text) < low or (high is not None and int(text) > high):
            span = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"{what} {span}, not {text!r}")
        return int(text)
    return parse


positive = whole(1)
zstd_level = whole(1, 22, "a zstd level")  # what the dump accepts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shards", type=positive, default=8)
    ap.add_argument("--shard-size", type=positive, default=256, help="sequences per shard [256]")
    ap.add_argument("--seq-len", type=positive, default=128)
    ap.add_argument("--batch-size", type=positive, default=32, help="teacher batch and student batch [32]")
    ap.add_argument("--top-k", type=positive, default=32)
    ap.add_argument("--hidden-dim", type=positive, default=128)
    ap.add_argument("--zstd-level", type=zstd_level, default=3)
    ap.add_argument("--rounds", type=positive, default=3, help="interleaved rounds; the best is kept [3]")
    ap.add_argument("--workers", default=None, help="worker counts to try, e.g. 1,2 [1..cores]")
    ap.add_argument("--write-results", action="store_true", help=f"write the tables into {RESULTS}")
    args = ap.parse_args()
    if args.quick:
        args.shards, args.shard_size, args.rounds = 2, 64, 1
    cores = len(os.sched_getaffinity(0))
    from kdpipe.pipeline.cores import MAX_WORKERS

    try:
        counts = [int(x) for x in args.workers.split(",")] if args.workers else list(range(1, cores + 1))
    except ValueError:
        ap.error(f"--workers takes whole numbers separated by commas, e.g. 1,2 (got {args.workers})")
    if min(counts) < 1 or max(counts) > MAX_WORKERS:
        ap.error(f"--workers: each count must be from 1 to {MAX_WORKERS} (got {args.workers})")
    import torch

    torch.set_num_threads(1)
    started = datetime.now(timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y")
    before = machine()
    seqs = sequences(args.shards * args.shard_size, args.seq_len)
    tokens = sum(len(s) for s in seqs)
    teacher = SyntheticTeacher(3 * args.shard_size * args.seq_len, args.top_k, args.hidden_dim)
    dump_s = {n: float("inf") for n in counts}
    load_s = {n: float("inf") for n in counts}
    floor_d = {n: float("inf") for n in counts}
    floor_l = {n: float("inf") for n in counts}
    main_s = {g: float("inf") for g in (False, True)}  # per shard, the caller gathering or the writers
    writer_s = {g: float("inf") for g in (False, True)}
    write_s = float("inf")  # per shard, writing its file (the disk's floor)
    pools = {n: writers(n, args.top_k, args.hidden_dim, args.zstd_level) for n in counts}
    with tempfile.TemporaryDirectory(prefix="kdpipe-host-") as tmp:
        out = Path(tmp) / "cache"
        for n in counts:  # warm-up
            dump_path(seqs[: args.shard_size * n], args.shard_size, args.batch_size, pools[n], out, teacher)
        for r in range(args.rounds):
            for g in ((False, True) if not os.environ.get('NONULL') else ()):
                null = NullWriters(pools[counts[0]].schema, keep=4, gathers=g)
                took = dump_path(seqs, args.shard_size, args.batch_size, null, out, teacher)
                main_s[g] = min(main_s[g], took / args.shards)
                writer_s[g] = min(writer_s[g], writer_alone(null.kept, null.schema, args.zstd_level) / len(null.kept))
            for n in counts:
                took = dump_path(seqs, args.shard_size, args.batch_size, pools[n], out, teacher)
                dump_s[n] = min(dump_s[n], took)
                paths = sorted((out / "shards").glob("shard-*.parquet"))
                if n == counts[0] and not os.environ.get('NOIO'):
                    write_s = min(write_s, time_file_writes(paths, Path(tmp) / "io") / len(paths))
                floor_d[n] = min(floor_d[n], floor(paths, "dump", args.zstd_level, n))
                manifest = manifest_of(out, args.shard_size, args.hidden_dim, args.top_k, args.seq_len)
                took, loaded = loader_path(out, manifest, args.batch_size, n)
                assert loaded == tokens, (loaded, tokens)
                load_s[n] = min(load_s[n], took); print(f'    loader n={n} {tokens/took:,.0f}', file=sys.stderr)
                floor_l[n] = min(floor_l[n], floor(paths, "loader", args.zstd_level, n))
            print(f"  round {r + 1}/{args.rounds}: " + " ".join(
                f"n={n} dump {tokens / dump_s[n]:,.0f} floor {tokens / floor_d[n]:,.0f} "
                f"loader {tokens / load_s[n]:,.0f} floor {tokens / floor_l[n]:,.0f}" for n in counts),
                file=sys.stderr, flush=True)
        on_disk = sum(p.stat().st_size for p in (out / "shards").glob("*.parquet")) / tokens
        raw = sum(b.size for p in sorted((out / "shards").glob("shard-*.parquet")) for b in raw_buffers(p)) / tokens
    after = machine().split("load average ")[1]
    text = report(args, counts, tokens, dump_s, floor_d, load_s, floor_l, raw, on_disk, started, before, after,
                  main_s, writer_s, write_s, cores)
    for p in pools.values():
        p.close()
    print(text)
    if args.write_results:
        write_section(SECTION, text)
        print(f"written to {RESULTS}", file=sys.stderr)


def floor(paths: list[Path], kind: str, level: int, n: int) -> float:
    """Seconds for the floor over `paths`, split over n processes (n = 1: in this process)."""
    if n == 1:
        return _floor_job((kind, paths, level, 1))
    parts = [paths[i::n] for i in range(n)]
    # each process times its own share, all at once; spawned, not forked: a fork marks this
    # process's memory copy-on-write, and the next path timed here would pay the faults
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        return max(pool.map(_floor_job, [(kind, p, level, 1) for p in parts]))


def report(args, counts, tokens, dump_s, floor_d, load_s, floor_l, raw, on_disk, started, before, after,
           main_s, writer_s, write_s, cores) -> str:
    cmd = ("python bench/host_pipeline.py " + " ".join(sys.argv[1:])).strip()
    one_d, one_l = tokens / dump_s[counts[0]], tokens / load_s[counts[0]]
    lines = [SECTION, "", f"`{cmd}` — {started}.",
             f"Machine: {before} at the start; {after} at the end.",
             f"{args.shards} shards of {args.shard_size} × {args.seq_len}-token sequences ({tokens:,} tokens), "
             f"k = {args.top_k}, 3 T, hidden {args.hidden_dim}, zstd level {args.zstd_level}; "
             f"{raw:.0f} B/token raw Arrow buffers, {on_disk:.0f} B/token on disk. Best of {args.rounds} "
             "interleaved rounds. Synthetic teacher (precomputed outputs, no cost).", "",
             f"Per shard, alone: the main thread's own work m = {main_s[False] * 1e3:.1f} ms with one writer, "
             f"{main_s[True] * 1e3:.1f} ms with several (the shard loop with a pool that encodes nothing; "
             f"masking included), a writer's w = {writer_s[False] * 1e3:.1f} ms and {writer_s[True] * 1e3:.1f} ms "
             f"(`writers.encode`; with several writers gathering and value checks too). On {cores} cores N "
             f"writers take at least max(m, w/N, (m+w)/C, io) per shard, where io = {write_s * 1e3:.1f} ms is "
             "writing the shard's file (temporary name, fsync, rename; one I/O thread writes them in order): "
             "the bound column is one writer's time over that, the most N writers can gain here; the disk "
             "column is the file writes' own rate, the dump's ceiling on this disk whatever the cores.", "",
             "| workers | dump host path tok/s | compress+hash floor tok/s | dump/floor | disk tok/s | scaling vs 1 | bound | "
             "loader tok/s | decompress+hash floor tok/s | loader/floor | scaling vs 1 |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in counts:
        d, fd, lo, fl = tokens / dump_s[n], tokens / floor_d[n], tokens / load_s[n], tokens / floor_l[n]
        most = bound((main_s[False], writer_s[False]), (main_s[True], writer_s[True]), n, cores, write_s)
        disk = tokens / (write_s * args.shards)
        lines.append(f"| {n} | {d:,.0f} | {fd:,.0f} | {d / fd:.2f} | {disk:,.0f} | {d / one_d:.2f}× | {most:.2f}× | {lo:,.0f} | {fl:,.0f} | "
                     f"{lo / fl:.2f} | {lo / one_l:.2f}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
