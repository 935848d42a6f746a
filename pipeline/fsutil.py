"""Atomic publication, hashing and locking: the primitives behind every resumability promise.

A file appears under its final name only once complete (write to a temporary sibling, fsync,
rename), so a reader or a resumed run never sees half a file, whatever killed the writer.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from filelock import FileLock, Timeout

from kdpipe.pipeline.errors import KdpipeError

TMP_SUFFIX = ".tmp"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_READ_BLOCK = 256 << 10  # hashed as soon as read, while it is still in the CPU's cache


def read_hashed(path: Path, size: int, into: bytearray) -> tuple[memoryview, str]:
    """The file's first `size` bytes read into `into` (at least `size` long; reused from file to
    file, so no fresh pages to fault in and zero) and their SHA-256, each block hashed as soon as
    it is read: one pass over memory instead of a read and then a hash (about half the time of
    `f.read()` and hashing that, on the machines measured in bench/RESULTS.md)."""
    view, h, at = memoryview(into)[:size], hashlib.sha256(), 0
    with open(path, "rb", buffering=0) as f:
        while at < size and (n := f.readinto(view[at:at + _READ_BLOCK])):
            h.update(view[at:at + n])
            at += n
    return view[:at], h.hexdigest()


def tmp_path_for(path: Path) -> Path:
    """The temporary sibling a file is written under; the pid keeps two writers apart."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS)
# how libraries that do not raise OSError report one: safetensors and tokenizers (Rust) end their
# message with "(os error 28)"; shutil.copytree collects "[Errno 28] ..." strings
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


def write_errno(e: BaseException) -> int | None:
    """The errno of a failed write (full disk, quota, file-size limit, permissions), found in the
    exception or its chain: torch.save into a file object raises a RuntimeError whose
    __context__ is the OSError, the Rust-backed savers put the errno only in their message."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen and not isinstance(cur, KdpipeError):
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _WRITE_ERRNOS:
            return cur.errno
        for m in _ERRNO_IN_TEXT.finditer(str(cur)):
            code = int(m.group(1) or m.group(2))
            if code in _WRITE_ERRNOS:
                return code
        cur = cur.__cause__ or cur.__context__
    return None


def write_error_message(path: Path | str, code: int) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device while writing {path}: {os.strerror(code)}"
    if code == errno.EFBIG:
        return (f"cannot write {path}: file too large (a file-size limit, e.g. `ulimit -f`, or the "
                "file system's maximum)")
    return f"cannot write {path}: {os.strerror(code)}"


@contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Turn a full disk, a quota or file-size limit, or a permission error into a one-line error
    naming the file, whichever library did the writing."""
    try:
        yield
    except KdpipeError:
        raise
    except Exception as e:
        code = write_errno(e)
        if code is None:
            raise
        raise KdpipeError(write_error_message(path, code)) from e


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through `write(fileobj)` to a temporary file, then rename into place."""
    path = Path(path)
    tmp = tmp_path_for(path)
    with disk_errors(path):
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


@contextmanager
def atomic_dir(target: Path, tmp: Path | None = None) -> Iterator[Path]:
    """A folder built inside the block under a temporary name (`tmp`, by default the sibling
    tmp_path_for gives), then renamed into place, so `target` is whole or absent. A killed
    writer's temporary is removed first, this one on any error; write errors name `target`."""
    tmp = tmp or tmp_path_for(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with disk_errors(target):
            yield tmp
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk gets its space back at once
        raise


def atomic_write_bytes(path: Path, data: Any) -> None:
    """`data`: bytes, or anything with the buffer protocol (an Arrow buffer, say)."""
    atomic_write(path, lambda f: f.write(data))


def dumps_json(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, fixed indent) so equal content gives equal bytes."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, dumps_json(obj))


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise KdpipeError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e


def remove_stale_tmp(directory: Path) -> int:
    """Delete temporary files left by a killed writer; returns how many were removed."""
    n = 0
    if directory.is_dir():
        for p in directory.glob(f".*{TMP_SUFFIX}"):
            if p.is_dir() and not p.is_symlink():  # a folder being published (tokenizer/, model/)
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            n += 1
    return n


@contextmanager
def exclusive_lock(directory: Path, what: str) -> Iterator[None]:
    """Hold an OS file lock on `directory` for the duration; a second writer is refused at once.

    The lock is an fcntl/flock lock, so the kernel drops it when its process dies: a crashed run
    never leaves the directory locked.
    """
    lock_path = Path(directory) / ".lock"
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout as e:
        raise KdpipeError(
            f"another kdpipe process is writing {what} {directory} (it holds the lock {lock_path}); "
            "wait for it to finish"
        ) from e
    try:
        yield
    finally:
        lock.release()


def ensure_dir(path: Path, what: str) -> Path:
    """Create `path` as a directory, with a clear error when a file is in the way."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise KdpipeError(f"{what} {path} exists and is not a directory")
    with disk_errors(path):
        path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise KdpipeError(f"{what} {path} is not writable")
    return path


def safe_join(root: Path, relative: str) -> Path:
    """Resolve a path read from a manifest, refusing anything that escapes `root`."""
    root = Path(root).resolve()
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise KdpipeError(f"manifest path {relative!r} escapes the cache directory {root}")
    target = (root / rel).resolve()
    if root != target and root not in target.parents:
        raise KdpipeError(f"manifest path {relative!r} escapes the cache directory {root}")
    return target
