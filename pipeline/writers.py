"""The dump's host workers: masking ahead of the teacher, encoding shards after it.

Shard writers: Arrow table, zstd Parquet encoding and SHA-256 of shards, off the main thread.

On an accelerator the teacher outruns one core's encoding, so shards are encoded by a pool of
writer threads (`--writers N`). Threads, not processes: Parquet encoding, zstd and SHA-256 release
the GIL (a writer holds it ~4% of its time, bench/RESULTS.md, issue 17), so N threads use N cores
with nothing pickled: a process pool copied each ~12 MB shard to its worker and the bytes back,
on the main thread, and two writer processes ran at half the speed of one thread. A writer
writes no file: it turns a shard's data into the file's bytes and their hash; one I/O thread
writes them in order (temporary name, fsync, rename), so a killed process publishes nothing
partial, and a disk error is reported where every other write's is. At most N shards are in
flight (queued or encoding), and one more is being made by the caller, so memory stays flat
whatever the corpus size.

With N > 1 writers the teacher's thread hands on more: each writer also gathers the teacher's
outputs into the shard's columns and checks their values (`dump.shard_data`), and masking, which
holds the GIL (Python per row), runs in max(1, N // 4) processes ahead of the teacher (one masking
process keeps up with about four writers). That thread then does little more than run the
teacher, so it caps the speed-up of more writers late. With one writer the caller masks, gathers
and checks: on 2 cores that splits the work about evenly between the two threads.

Each shard's bytes are a function of its data alone: the same whatever the number of writers.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kdpipe.pipeline.cores import MAX_WORKERS, die_with_parent, worker_pid
from kdpipe.pipeline.errors import KdpipeError
from kdpipe.pipeline.fsutil import atomic_write_bytes
from kdpipe.pipeline.masking import mask_sequences
from kdpipe.pipeline.shards import ShardData, shard_bytes, to_table


def check_writers(n: int) -> int:
    if not isinstance(n, int) or n < 1 or n > MAX_WORKERS:
        raise KdpipeError(f"--writers must be a whole number from 1 to {MAX_WORKERS}, not {n}")
    return n


def encode(data: ShardData | Callable[[], ShardData], schema: pa.Schema, fingerprint_sha256: str,
           zstd_level: int) -> tuple[pa.Buffer, str]:
    """A shard's file bytes and their SHA-256 (what a writer thread does; it narrows the vector
    columns to their stored dtypes if the caller has not). `data` may be the function that makes
    the shard's data (see `ShardWriters.gathers`); an error it raises is the shard's. The bytes
    stay in Arrow's buffer, handed to the file without a copy."""
    if callable(data):
        data = data()
    buf = shard_bytes(to_table(data, schema), fingerprint_sha256, zstd_level)
    return buf, hashlib.sha256(buf).hexdigest()


class ShardWriters:
    """Encode shards in `n` writer threads, write each one atomically in order of submission.

    `submit` blocks while n shards are in flight; `close` waits for all and raises the first
    error. `written` maps each path written to its SHA-256 (the manifest needs it).

    gathers: with several writers the caller hands `submit` a function making each shard's data
    (gathering the teacher's outputs, the value checks), run by the writer, so the teacher's
    thread does only what must be done there; with one writer the caller makes the data itself
    (the caller and the writer then have about equal work, each on its core)."""

    def __init__(self, n: int, schema: pa.Schema, fingerprint_sha256: str, zstd_level: int) -> None:
        self.n = check_writers(n)
        self.args = (schema, fingerprint_sha256, zstd_level)
        self.schema = schema
        self.written: dict[Path, str] = {}
        self._pool = ThreadPoolExecutor(self.n, thread_name_prefix="kdpipe-writer")
        self.maskers = 0 if n == 1 else max(1, n // 4)
        self.gathers = n > 1
        self._maskers: Executor | None = None if n == 1 else ProcessPoolExecutor(
            self.maskers, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent,
            initargs=(os.getpid(),))
        self._io = ThreadPoolExecutor(1, thread_name_prefix="kdpipe-shard-io")  # write + fsync + rename
        self._encoding: deque[tuple[Path, Future]] = deque()
        self._writing: Future | None = None
        if self._maskers is not None:  # start every process now (a fresh interpreter each)
            list(self._maskers.map(worker_pid, range(self.maskers)))

    def mask(self, spec: Any, first_seq: int, seqs: list[np.ndarray]) -> Future | None:
        """A shard's masked rows (`masking.mask_sequences` with a `dump.RowSpec`'s settings) from a
        masking process; None with one writer: the caller masks."""
        if self._maskers is None:
            return None
        return self._maskers.submit(mask_sequences, seqs, first_seq, spec.views, spec.masking, spec.vocab,
                                    spec.pool, spec.weights)

    def submit(self, path: Path, data: ShardData | Callable[[], ShardData]) -> None:
        while len(self._encoding) >= self.n:
            self._write_oldest()
        self._encoding.append((path, self._pool.submit(encode, data, *self.args)))

    def _write_oldest(self) -> None:
        path, fut = self._encoding.popleft()
        data, sha = fut.result()
        if self._writing is not None:
            self._writing.result()  # one file at a time: its bytes are freed before the next
        self._writing = self._io.submit(self._write, path, data, sha)

    def _write(self, path: Path, data: pa.Buffer, sha: str) -> None:
        atomic_write_bytes(path, data)
        self.written[path] = sha

    def drain(self) -> None:
        """Write everything submitted so far."""
        while self._encoding:
            self._write_oldest()
        if self._writing is not None:
            self._writing.result()

    def close(self) -> None:
        """Write everything submitted; on an error, drop what is queued and raise it."""
        try:
            self.drain()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        for _, fut in self._encoding:
            fut.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._maskers is not None:
            self._maskers.shutdown(wait=True, cancel_futures=True)
        self._io.shutdown(wait=True)

    def __enter__(self) -> "ShardWriters":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.shutdown()  # the error in flight is the one to report

