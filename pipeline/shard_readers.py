"""The loader's shard readers in worker processes, handing decoded shards back through shared memory.

Threads do not decode a cache at an accelerator's rate: a loader thread holds the GIL for about a
fifth of its time (the Arrow-to-numpy glue, the Python around the value checks and collation),
and two of them on two cores ran 1.2x one, each slower than alone (bench/RESULTS.md, issue 17).
So with several loader workers each shard is read, hash-checked, decoded and checked
(`loader.read_parts`, unchanged) in a worker process, which copies the decoded columns into a
slot: a file of shared memory (/dev/shm) that this process made and both keep mapped. The loader
builds the shard's arrays as read-only views of its mapping (no copy, nothing pickled but where
each column lies), and the slot is handed out again only once the last of those views is gone
(a weak reference on the array they are all views of), so a slot is never overwritten under a
window in use.

Slots are made once and reused: on the VMs measured, making a fresh 13 MB file of shared
memory, mapping and freeing it cost about 13 ms of kernel time a shard, more than half of what
decoding it costs. A slot grows (`posix_fallocate`, so a full /dev/shm is one clear error, never
a SIGBUS) when a shard needs more than it holds, and a new one is made when all back shards still
in use (the window trained on, the next one being read, the windows of batches still being
collated): as many as shards are in use at once, as many as reading in threads holds in memory.

The pool is started once per process and worker count (a fresh interpreter per
worker, ~2 s with torch), and kept for later loaders; its workers exit with the process that
started them, and the slot files are removed at exit (and, after a kill, by the next loader).
Where there is no /dev/shm with room for the slots, or the cache lives on a store (its fetcher
is this process's), the loader reads in threads instead, and says why once on stderr.
"""

from __future__ import annotations

import atexit
import mmap
import multiprocessing
import os
import queue
import re
import sys
import threading
import weakref
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from kdpipe.pipeline.cores import die_with_parent, worker_pid
from kdpipe.pipeline.errors import KdpipeError
from kdpipe.pipeline.shards import ShardData
from kdpipe.schemas.manifest import Manifest, ShardEntry

SHM = Path("/dev/shm")
_PREFIX = "kdpipe-loader-"
_ALIGN = 64  # each column starts on a cache line
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # map every page at once, not one fault at a time

Layout = list[dict[str, tuple[int, str, tuple[int, ...]]]]  # per row group: column -> (offset, dtype, shape)


def why_not(cache_dir: Path, manifest: Manifest, window: int) -> str | None:
    """Why worker processes cannot hand this cache's shards back, or None when they can: they need
    a local cache (a store's fetcher lives in this process) and a /dev/shm with room for the slots
    a loader usually holds (the window trained on, the next one read, two more for batches still
    being collated; twice the largest shard's file each, as decoded columns take more than their
    compressed bytes). The reason is said once (`note_threads`): a container's default /dev/shm
    of 64 MB would otherwise slow the loader without a word."""
    from kdpipe.pipeline.cache import _fetcher

    if _fetcher(cache_dir) is not None:
        return "the cache is on a store"
    if not SHM.is_dir() or not os.access(SHM, os.W_OK):
        return f"there is no writable {SHM}"
    st = os.statvfs(SHM)
    need = (2 * window + 2) * 2 * max((e.bytes for e in manifest.shards), default=0)
    free = st.f_bavail * st.f_frsize
    if free < need:
        return (f"{SHM} has {free / 2**20:,.0f} MiB free and the worker processes need {need / 2**20:,.0f} MiB "
                "(in a container, give it more: docker run --shm-size=2g)")
    return None


_noted: set[str] = set()


def note_threads(why: str, workers: int) -> None:
    """One line on stderr, once per reason and process: the loader reads in threads because `why`."""
    if why in _noted:
        return
    _noted.add(why)
    from tqdm import tqdm

    tqdm.write(f"kdpipe: note: the loader reads shards in {workers} threads, not worker processes, as {why}; "
               "threads decode more slowly", file=sys.stderr)


class _Base(np.ndarray):
    """The array every column of one shard in a slot is a view of (a subclass, so numpy keeps it as
    their base rather than collapsing to the mapping): when it goes, the slot is free."""


class ProcessReaders:
    """`n` worker processes running `loader.read_parts`; `submit` gives a Future of the shard's
    row groups as arrays over a slot of shared memory."""

    def __init__(self, n: int) -> None:
        _sweep_stale()
        self._names: list[str] = []  # slot -> its file in SHM
        self._lock = threading.Lock()
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._maps: dict[int, mmap.mmap] = {}  # slot -> this process's mapping of it
        self._pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=die_with_parent, initargs=(os.getpid(),))
        self.pids = list(self._pool.map(worker_pid, range(n)))  # start every process now
        self.broken = False  # a worker died: this pool takes no more work

    def _slot(self) -> int:
        """A free slot, or a new one where every slot backs a shard still in use (so there are as
        many as shards are in use at once, as many as reading in threads would hold)."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:  # two loaders in one process may share the pool
            name = f"{_PREFIX}{os.getpid()}-{len(self._names)}"
            (SHM / name).touch(mode=0o600)
            self._names.append(name)
            return len(self._names) - 1

    def submit(self, cache_dir: Path, entry: ShardEntry, manifest: Manifest) -> "Future[list[ShardData]]":
        from kdpipe.pipeline.cache import _expected_fingerprint

        slot = self._slot()
        cache_dir = Path(cache_dir)
        out: Future[list[ShardData]] = Future()
        out.set_running_or_notify_cancel()

        def done(f: Future) -> None:
            try:
                out.set_result(self._attach(slot, *f.result()))
            except BaseException as e:  # the worker's error (a corrupt shard, no room) is the shard's
                self._free.put(slot)
                out.set_exception(self._died(entry) if isinstance(e, BrokenProcessPool) else e)

        try:
            job = self._pool.submit(_decode, cache_dir, entry, manifest,
                                    _expected_fingerprint.get(cache_dir.resolve()), self._names[slot])
        except BrokenProcessPool:
            self._free.put(slot)
            out.set_exception(self._died(entry))
            return out
        job.add_done_callback(done)
        return out

    def _died(self, entry: ShardEntry) -> KdpipeError:
        """The error for a shard whose worker died; the pool takes no more work (`readers` starts anew)."""
        self.broken = True
        return KdpipeError(f"a loader worker process died while reading {entry.path} (killed, or out of "
                           "memory); rerun (a run resumes from its last checkpoint), or with --loader-workers 1")

    def _attach(self, slot: int, layout: Layout, size: int) -> list[ShardData]:
        """The row groups a worker wrote into `slot`, as read-only views of this process's mapping."""
        mm = self._maps.get(slot)
        if mm is None or len(mm) < size:  # new, or grown by the worker: map it (again)
            with open(SHM / self._names[slot], "rb") as f:
                mm = self._maps[slot] = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | _POPULATE,
                                                  prot=mmap.PROT_READ)
        base = np.frombuffer(mm, dtype=np.uint8, count=size).view(_Base)
        weakref.finalize(base, self._free.put, slot)
        return [ShardData(**{f: base[off:off + int(np.prod(shape)) * np.dtype(dtype).itemsize]
                             .view(np.ndarray).view(dtype).reshape(shape)
                             for f, (off, dtype, shape) in fields.items()}) for fields in layout]

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for name in self._names:
            (SHM / name).unlink(missing_ok=True)  # mappings still in use keep their memory


_pools: dict[int, ProcessReaders] = {}
_pools_lock = threading.Lock()


def readers(n: int) -> ProcessReaders:
    """This process's pool of n reader processes, started on first use."""
    with _pools_lock:
        if n in _pools and _pools[n].broken:
            _pools.pop(n).close()
        if n not in _pools:
            _pools[n] = ProcessReaders(n)
        return _pools[n]


@atexit.register
def _close_all() -> None:
    for pool in _pools.values():
        pool.close()
    _pools.clear()


# ------------------------------------------------------------------------------ in the worker

_mapped: dict[str, mmap.mmap] = {}  # slot file -> this worker's mapping of it


def _decode(cache_dir: Path, entry: ShardEntry, manifest: Manifest, fingerprint: str | None,
            name: str) -> tuple[Layout, int]:
    """One shard read and checked as the loader reads it, its row groups' columns copied into the
    slot file `name` (grown if they do not fit): where each lies, and the bytes used."""
    from kdpipe.pipeline import cache
    from kdpipe.pipeline.loader import read_parts

    if fingerprint is not None:  # what the loader's load_manifest expects of every shard's footer
        cache._expected_fingerprint[Path(cache_dir).resolve()] = fingerprint
    parts = read_parts(cache_dir, entry, manifest)
    layout: Layout = []
    size = 0
    for data in parts:
        fields = {}
        for f in ShardData.__dataclass_fields__:
            a = getattr(data, f)
            if isinstance(a, np.ndarray):
                fields[f] = (size, a.dtype.str, a.shape)
                size += -(-a.nbytes // _ALIGN) * _ALIGN
        layout.append(fields)
    mm = _slot(name, size)
    for data, fields in zip(parts, layout):
        for f, (off, dtype, shape) in fields.items():
            np.ndarray(shape, dtype, buffer=mm, offset=off)[...] = getattr(data, f)
    return layout, size


def _slot(name: str, size: int) -> mmap.mmap:
    """This worker's mapping of a slot file at least `size` bytes long (grown here if it is not)."""
    path = SHM / name
    fd = os.open(path, os.O_RDWR)
    try:
        have = os.fstat(fd).st_size
        if have < size:
            try:  # no room: an error here, not a SIGBUS at the first write
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                raise KdpipeError(f"no room in {SHM} for a decoded shard ({size / 1e6:.0f} MB; the loader's "
                                  f"worker processes hand shards over through it): {e.strerror}. Give the container "
                                  "more shared memory (docker run --shm-size=1g) or train with --loader-workers 1"
                                  ) from None
            have = size
        mm = _mapped.get(name)
        if mm is None or len(mm) < have:
            if mm is not None:
                mm.close()
            mm = _mapped[name] = mmap.mmap(fd, have, flags=mmap.MAP_SHARED | _POPULATE)
    finally:
        os.close(fd)
    return mm


# ------------------------------------------------------------------------------ housekeeping

def _sweep_stale() -> None:
    """Remove the slot files a killed loader left behind (its process id is gone)."""
    try:
        names = os.listdir(SHM)
    except OSError:
        return
    for name in names:
        if (m := re.match(rf"{_PREFIX}(\d+)-\d+$", name)) and not _alive(int(m.group(1))):
            (SHM / name).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
