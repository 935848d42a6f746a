"""Caches and run directories at fsspec URLs (s3://, gs://, file://): local staging, then publication.

    kdpipe teacher-dump ... --out s3://bucket/caches/wiki
    kdpipe student-train --cache s3://bucket/caches/wiki --out s3://bucket/runs/l3 ...
    kdpipe cache verify s3://bucket/caches/wiki

An object store has no rename and no lock, so a stage never works on it directly. A stage whose
output is a URL works in a local staging folder ($KDPIPE_HOME/staging/, locked as any output
folder is) exactly as it does on disk, and a background thread publishes what appears there under
a final name (files appear by rename only once complete): each file is uploaded as one object (a
PUT is atomic: an object is absent or whole). The commit object of the output (a cache's
manifest.json, a run's final/kdpipe_student.json) is uploaded last, and only after every other
file is on the store with its local size; a checkpoint's checkpoint.json is uploaded after its
tensors, so a checkpoint on the store counts only once its meta object exists. A kill at any
point leaves no manifest listing a missing shard. The store is the truth: a rerun (here or on
another machine) starts from what the store holds, downloading the finished shards whose Parquet
footer carries this cache's fingerprint rather than recomputing them (fetched whole: the manifest
hashes the bytes it lists), or the run's latest complete checkpoint.

A cache read from a URL is mirrored into a per-process folder: the small files at once, each
shard when it is first opened (`cache.open_shard` checks its SHA-256 against the manifest as
for a local cache), the least recently fetched shards evicted beyond $KDPIPE_SHARD_CACHE_MB
(default 2048), so local disk stays bounded.

A store key is text the store hands us: every mirror and pull turns keys into local paths through
`Store.join`, which refuses `..`, absolute keys, empty parts and anything that would land outside
the folder (symlinks resolved), and a listing that names an object outside the folder asked for.

`file://` URLs are plain local paths. Credentials and endpoints come from the usual environment
of the filesystem (for s3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdpipe.pipeline.errors import KdpipeError, first_line
from kdpipe.pipeline.fsutil import atomic_dir, exclusive_lock, sha256_bytes
from kdpipe.schemas.checkpoint import (
    CHECKPOINT_META, CHECKPOINT_PATTERN, CHECKPOINTS_DIR, FINAL_DIR, LATEST_NAME, METRICS_NAME, RUN_NAME,
    SAMPLES_NAME, STUDENT_RECORD_NAME, checkpoint_name,
)
from kdpipe.schemas.manifest import FINGERPRINT_NAME, HEAD_NAME, MANIFEST_NAME, PROJECTION_NAME, SHARDS_DIR
from kdpipe.schemas.report import REPORT_NAME, SETTINGS_NAME
from kdpipe.schemas.shard import SHARD_RE

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
FINAL_MARKER = f"{FINAL_DIR}/{STUDENT_RECORD_NAME}"  # a run's commit object
_STEP = CHECKPOINT_PATTERN.removeprefix("^").removesuffix("$")  # a checkpoint folder's name, step captured
_CHECKPOINT_UNIT = re.compile(rf"^{CHECKPOINTS_DIR}/{_STEP}/")
_CHECKPOINT_META = re.compile(rf"^{CHECKPOINTS_DIR}/{_STEP}/{re.escape(CHECKPOINT_META)}$")
_SHARD = re.compile(SHARD_RE)
_PIP_HINT = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


# ------------------------------------------------------------------------------------ locations

def scheme(loc: str) -> str | None:
    m = _SCHEME.match(str(loc))
    return m.group(1).lower() if m else None


def is_url(loc: Any) -> bool:
    return isinstance(loc, str) and scheme(loc) is not None


def is_remote(loc: Any) -> bool:
    """A URL on a store (anything but file://)."""
    return is_url(loc) and scheme(loc) != "file"


def file_url_path(url: str) -> str:
    """file:///abs/path -> /abs/path (file://rel/path -> rel/path)."""
    from urllib.parse import unquote

    return unquote(url[len("file://"):]) or "/"


def kdpipe_home() -> Path:
    return Path(os.environ.get("KDPIPE_HOME") or Path.home() / ".cache" / "kdpipe").expanduser()


def staging_dir(kind: str, url: str) -> Path:
    """The local folder an output at `url` is built in: one per URL, kept across reruns."""
    folder = kdpipe_home() / "staging" / f"{kind}-{sha256_bytes(url.rstrip('/').encode())[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder.resolve()


@contextmanager
def store_errors(url: str) -> Iterator[None]:
    """Whatever the filesystem library raises, as a one-line KdpipeError naming the URL."""
    try:
        yield
    except KdpipeError:
        raise
    except ImportError as e:
        pkg = _PIP_HINT.get(scheme(url) or "", "the fsspec filesystem of this scheme")
        raise KdpipeError(f"{url}: reading or writing {scheme(url)}:// needs {pkg} "
                          f"(pip install {pkg if ' ' not in pkg else 'it'}): {e}") from None
    except ValueError as e:
        if "Protocol not known" in str(e):
            raise KdpipeError(f"{url}: unknown URL scheme {scheme(url)!r} (use a local path, file://, "
                              "s3:// or another fsspec protocol)") from None
        raise KdpipeError(f"{url}: {first_line(e)}") from None
    except Exception as e:  # network, credentials, permissions: botocore and friends raise many kinds
        raise KdpipeError(f"{url}: {type(e).__name__}: {first_line(e)}") from None


class Store:
    """A folder on an fsspec filesystem, addressed by paths relative to it."""

    def __init__(self, url: str, what: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        with store_errors(url):
            self.fs, root = fsspec.core.url_to_fs(self.url)
            self.root = root.rstrip("/")
            bucket = self.root.split("/", 1)[0]
            if scheme(url) not in _PIP_HINT:  # not an object store: no bucket to check
                return
            if not bucket:
                raise KdpipeError(f"{what} {url}: the URL names no bucket")
            if not self.fs.exists(bucket):
                raise KdpipeError(f"{what} {url}: bucket {bucket!r} does not exist or these "
                                  "credentials cannot see it")

    def key(self, rel: str) -> str:
        return f"{self.root}/{self.checked(rel)}"

    def checked(self, rel: str) -> str:
        """`rel` if it names an object strictly inside the folder: a store key is text, and one
        holding `..`, an absolute path or an empty part would land a mirror or a pull outside the
        local folder it is joined onto (or address an object outside this store folder)."""
        parts = rel.split("/")
        if not rel or rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") for p in parts):
            raise KdpipeError(f"{self.url}: the store lists the key {rel!r}, which leaves the folder it "
                              "is listed under; refusing to read from a damaged or hostile store")
        return rel

    def join(self, folder: Path, rel: str) -> Path:
        """The one way a store key becomes a local path: `folder / rel`, refused (one line) unless it
        stays inside `folder`, symlinks resolved. Every mirror and pull goes through it."""
        root = Path(folder).resolve()
        target = (root / self.checked(rel)).resolve()
        if root not in target.parents:
            raise KdpipeError(f"{self.url}: the store key {rel!r} would be written outside {root}; "
                              "refusing to read from a damaged or hostile store")
        return target

    def files(self) -> dict[str, int]:
        """Relative path -> size of every object under the folder (one listing); a key that leaves
        the folder, or an object listed outside it, is refused rather than skipped."""
        with store_errors(self.url):
            self.fs.invalidate_cache()
            found = self.fs.find(self.root, detail=True)
        n = len(self.root) + 1
        out = {}
        for k, v in found.items():
            if v.get("type", "file") != "file":
                continue
            if not k.startswith(self.root + "/"):
                raise KdpipeError(f"{self.url}: the store lists {k!r}, outside the folder asked for; "
                                  "refusing to read from a damaged or hostile store")
            out[self.checked(k[n:])] = int(v.get("size") or 0)
        return out

    def cat(self, rel: str) -> bytes:
        with store_errors(self.url):
            return self.fs.cat_file(self.key(rel))

    def put(self, local: Path, rel: str) -> None:
        """One object from one local file (a missing local file raises FileNotFoundError)."""
        if not local.is_file():
            raise FileNotFoundError(local)
        with store_errors(self.url):
            self.fs.put_file(str(local), self.key(rel))

    def get(self, rel: str, folder: Path, strip: str = "") -> Path:
        """Download the object `rel` to `folder`/`rel` (less the prefix `strip`; through `join`) by
        a temporary sibling, then rename: a local file is whole or absent. Returns the local path."""
        if not rel.startswith(strip):
            raise ValueError(f"{rel!r} does not start with {strip!r}")
        self.checked(rel)
        local = self.join(folder, rel[len(strip):])
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with store_errors(self.url):
                self.fs.get_file(self.key(rel), str(tmp))
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
        return local

    def delete(self, rel: str) -> None:
        with store_errors(self.url):
            if self.fs.exists(self.key(rel)):
                self.fs.rm_file(self.key(rel))

    def put_many(self, rels: list[str], folder: Path) -> None:
        """Upload several files at once (concurrent requests), one object each."""
        if missing := [r for r in rels if not (folder / r).is_file()]:
            raise FileNotFoundError(folder / missing[0])
        with store_errors(self.url):
            self.fs.put([str(folder / r) for r in rels], [self.key(r) for r in rels])

    def get_many(self, rels: list[str], folder: Path) -> None:
        """Download several objects at once (concurrent requests) into `folder`, keeping their
        relative paths; the caller checks and renames them into place."""
        if rels:
            locals_ = [str(self.join(folder, r)) for r in rels]
            for p in locals_:
                Path(p).parent.mkdir(parents=True, exist_ok=True)
            with store_errors(self.url):
                self.fs.get([self.key(r) for r in rels], locals_)


# ---------------------------------------------------------------------------------- publication

def _local_files(root: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of every published file: hidden names (locks, temporaries,
    folders being assembled) are skipped."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except FileNotFoundError:  # pruned meanwhile
                continue
            out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def _rank(rel: str) -> int:
    """Upload order: plain files, then each checkpoint's meta (after its tensors), then `latest`."""
    if _CHECKPOINT_META.match(rel):
        return 1
    if rel == f"{CHECKPOINTS_DIR}/{LATEST_NAME}":
        return 2
    return 0


def _unit(rel: str) -> str | None:
    m = _CHECKPOINT_UNIT.match(rel)
    return m.group(0) if m else None


class Publisher:
    """Mirrors a staging folder onto a store while a stage runs; `finish` uploads the commit object."""

    def __init__(self, staging: Path, store: Store, commit: str, sent: dict[str, tuple[int, int]],
                 interval: float = 0.5) -> None:
        self.staging, self.store, self.commit, self.sent = staging, store, commit, dict(sent)
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sync(self) -> None:
        """Upload every new or changed file but the commit object, in `_rank` order; drop from the
        store the checkpoints this run uploaded and has since pruned (meta object first)."""
        files = _local_files(self.staging)
        todo = [r for r in files if r != self.commit and self.sent.get(r) != files[r]]
        plain = [r for r in todo if _rank(r) == 0 and _unit(r) is None]
        if len(plain) > 1:  # files nothing else waits on (shards, parts): concurrent requests
            try:
                self.store.put_many(plain, self.staging)
                self.sent.update({r: files[r] for r in plain})
            except FileNotFoundError:
                pass  # one vanished meanwhile: the loop below uploads the others one by one
        failed: set[str] = set()
        for rel in sorted(todo, key=lambda r: (_rank(r), r)):
            if self.sent.get(rel) == files[rel]:
                continue
            unit = _unit(rel)
            if unit in failed:
                continue  # a checkpoint that vanished mid-upload never gets its meta object
            try:
                self.store.put(self.staging / rel, rel)
            except FileNotFoundError:
                failed.add(unit or rel)
                continue
            self.sent[rel] = files[rel]
        gone = {u for r in self.sent if (u := _unit(r))} - {u for r in files if (u := _unit(r))}
        for unit in sorted(gone):
            rels = sorted((r for r in self.sent if r.startswith(unit)), key=lambda r: -_rank(r))
            for rel in rels:  # checkpoint.json first: the checkpoint stops counting before it shrinks
                self.store.delete(rel)
                del self.sent[rel]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sync()
            except Exception:  # retried on the next pass; `finish` reports what still fails
                pass

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="kdpipe-publish", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def finish(self) -> bool:
        """Last sync, check every file is on the store at its local size, then the commit object.
        Returns whether there was a commit object to publish."""
        self.sync()
        local = _local_files(self.staging)
        remote = self.store.files()
        missing = [r for r, (size, _) in local.items() if r != self.commit and remote.get(r) != size]
        if missing:
            raise KdpipeError(f"{self.store.url}: {len(missing)} file(s) did not reach the store "
                              f"({missing[0]}, ...); not publishing {self.commit}: rerun to complete")
        path = self.staging / self.commit
        if not path.is_file():
            return False
        if remote.get(self.commit) != path.stat().st_size or self.store.cat(self.commit) != path.read_bytes():
            self.store.put(path, self.commit)
        return True


# ------------------------------------------------------------------------------- staging set-up

def _clear(folder: Path) -> None:
    """Empty a staging folder (ours), keeping its lock file."""
    for p in folder.iterdir():
        if p.name == ".lock":
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def prepare_cache(store: Store, staging: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """Bring the staging folder in line with the store before a dump: the store's fingerprint,
    projection and head, its manifest if it has one, and every shard whose footer carries this
    fingerprint. Returns the files that are on the store already and how many shards were reused."""
    from kdpipe.pipeline.cache import fingerprint_sha256
    from kdpipe.pipeline.shards import read_fingerprint

    remote = store.files()
    if not remote:
        _clear(staging)  # the store is the truth: a staging folder it knows nothing of is stale
        return {}, 0
    if FINGERPRINT_NAME not in remote:
        raise KdpipeError(f"{store.url} is not empty and holds no kdpipe cache; refusing to write into it")
    fp_bytes = store.cat(FINGERPRINT_NAME)
    local_fp = staging / FINGERPRINT_NAME
    if MANIFEST_NAME in remote or (local_fp.is_file() and local_fp.read_bytes() != fp_bytes):
        _clear(staging)  # published already (nothing here may replace it), or another cache
    sent: dict[str, tuple[int, int]] = {}

    def pull(rel: str) -> None:
        local = store.join(staging, rel)
        if not local.is_file():
            store.get(rel, staging)
        if local.stat().st_size == remote[rel]:
            sent[rel] = _stamp(local)

    for rel in (FINGERPRINT_NAME, PROJECTION_NAME, HEAD_NAME, MANIFEST_NAME):
        if rel in remote:
            pull(rel)
    if MANIFEST_NAME in remote:
        return sent, 0  # complete: the stage says so (or refuses other settings)
    try:
        fp_sha = fingerprint_sha256(json.loads(fp_bytes))
    except (ValueError, AttributeError):
        raise KdpipeError(f"{store.url}/{FINGERPRINT_NAME} is not valid JSON; not a kdpipe cache") from None
    # shards finished elsewhere: fetched whole (they are needed whole to hash into the manifest), kept
    # only if their footer carries this fingerprint; any other object is redone and overwritten
    wanted = sorted(r for r in remote if _SHARD.match(r) and not store.join(staging, r).is_file())
    pulled = staging / f".pull.{os.getpid()}.tmp"
    (staging / SHARDS_DIR).mkdir(exist_ok=True)
    shutil.rmtree(pulled, ignore_errors=True)
    reused = 0
    try:
        store.get_many(wanted, pulled)
        for rel in wanted:
            try:
                ok = read_fingerprint(store.join(pulled, rel)) == fp_sha
            except Exception:  # a damaged or foreign object
                ok = False
            if ok:
                os.replace(store.join(pulled, rel), store.join(staging, rel))
                sent[rel] = _stamp(store.join(staging, rel))
                reused += 1
    finally:
        shutil.rmtree(pulled, ignore_errors=True)
    return sent, reused


def _local_latest_step(staging: Path) -> int:
    try:
        name = (staging / CHECKPOINTS_DIR / LATEST_NAME).read_text().strip()
        m = re.match(CHECKPOINT_PATTERN, name)
        return int(m.group(1)) if m and (staging / CHECKPOINTS_DIR / name).is_dir() else -1
    except (OSError, ValueError):
        return -1


def prepare_run(store: Store, staging: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """Bring the staging folder in line with the store before training: run.json, metrics, and the
    latest checkpoint whose meta object exists (or the finished model's marker)."""
    remote = store.files()
    if not remote:
        _clear(staging)
        return {}, 0
    if RUN_NAME not in remote:
        raise KdpipeError(f"run directory {store.url} is not empty and holds no kdpipe student run; "
                          "refusing to write into it (use another --out)")
    record = store.cat(RUN_NAME)
    local = staging / RUN_NAME
    if FINAL_MARKER in remote or not local.is_file() or local.read_bytes() != record:
        _clear(staging)  # finished already (nothing here may replace it), or another run
    sent: dict[str, tuple[int, int]] = {}

    def pull(rel: str) -> None:
        local = store.join(staging, rel)
        if not local.is_file() or local.stat().st_size != remote[rel]:
            store.get(rel, staging)
        sent[rel] = _stamp(local)

    pull(RUN_NAME)
    if FINAL_MARKER in remote:
        pull(FINAL_MARKER)  # the stage sees final/ and says the run is complete
        return sent, 0
    steps = sorted(int(m.group(1)) for r in remote if (m := _CHECKPOINT_META.match(r)))
    if not steps or steps[-1] <= _local_latest_step(staging):
        return sent, 0  # what is staged here is as far on (its metrics cover its checkpoint)
    for rel in (METRICS_NAME, SAMPLES_NAME):  # uploaded before the meta object, so they
        if rel in remote:  # reach the checkpoint; truncated to its step on resume
            pull(rel)
    name = checkpoint_name(steps[-1])
    prefix = f"{CHECKPOINTS_DIR}/{name}/"
    final = staging / CHECKPOINTS_DIR / name
    with atomic_dir(final, staging / CHECKPOINTS_DIR / f".tmp-{name}.pull") as tmp:
        for rel in sorted(r for r in remote if r.startswith(prefix)):
            store.get(rel, tmp, strip=prefix)
        shutil.rmtree(final, ignore_errors=True)
    (staging / CHECKPOINTS_DIR / LATEST_NAME).write_text(name + "\n")
    for rel in remote:
        if rel.startswith(prefix):
            sent[rel] = _stamp(store.join(staging, rel))
    return sent, steps[-1]


def prepare_report(store: Store, staging: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """Bring the staging folder in line with the store before an eval: its settings and every
    finished part (small files), so nothing done is redone."""
    remote = store.files()
    if not remote:
        _clear(staging)
        return {}, 0
    if SETTINGS_NAME not in remote:
        raise KdpipeError(f"report directory {store.url} is not empty and holds no kdpipe eval report; "
                          "refusing to write into it")
    if (staging / SETTINGS_NAME).is_file() and (staging / SETTINGS_NAME).read_bytes() != store.cat(
            SETTINGS_NAME):
        _clear(staging)
    local = {r: store.join(staging, r) for r in remote}
    wanted = sorted(r for r, p in local.items() if not p.is_file() or p.stat().st_size != remote[r])
    pulled = staging / f".pull.{os.getpid()}.tmp"
    shutil.rmtree(pulled, ignore_errors=True)
    try:
        store.get_many(wanted, pulled)
        for rel in wanted:
            local[rel].parent.mkdir(parents=True, exist_ok=True)
            os.replace(store.join(pulled, rel), local[rel])
    finally:
        shutil.rmtree(pulled, ignore_errors=True)
    return {r: _stamp(p) for r, p in local.items()}, 0


# kind of output -> how its staging folder is prepared, and its commit object (uploaded last)
KINDS: dict[str, tuple[Callable[[Store, Path], tuple[dict[str, tuple[int, int]], int]], str, str]] = {
    "cache": (prepare_cache, MANIFEST_NAME, "cache"),
    "run": (prepare_run, FINAL_MARKER, "run directory"),
    "report": (prepare_report, REPORT_NAME, "report directory"),
}


# ---------------------------------------------------------------------------- mirrored caches

class RemoteShards:
    """Fetches a remote cache's shards into a local folder on first open, within a byte budget."""

    def __init__(self, store: Store, root: Path, sizes: dict[str, int], budget: int) -> None:
        self.store, self.root, self.sizes, self.budget = store, root, sizes, budget
        self.fetched: list[str] = []  # oldest first
        self.lock = threading.Lock()

    def fetch(self, rel: str) -> None:
        with self.lock:
            path = self.store.join(self.root, rel)
            if path.is_file() or rel not in self.sizes:
                return  # a shard the store lacks is reported missing by the caller
            need = self.sizes[rel]
            used = sum(self.sizes.get(r, 0) for r in self.fetched)
            while self.fetched and used + need > self.budget:
                old = self.fetched.pop(0)
                self.store.join(self.root, old).unlink(missing_ok=True)
                used -= self.sizes.get(old, 0)
            self.store.get(rel, self.root)
            self.fetched.append(rel)

    def shard_files(self) -> list[str]:
        return sorted(r for r in self.sizes if _SHARD.match(r))


def _remove_dead_mirrors(base: Path) -> None:
    """Mirror folders of processes that are gone (killed before their exit handler ran)."""
    for p in base.glob("cache-*-*"):
        try:
            pid = int(p.name.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue


def mirror_cache(url: str) -> Path:
    """A local folder standing for the cache at `url`: its small files now, shards on demand."""
    from kdpipe.pipeline import cache as cachedir

    store = Store(url, "cache")
    remote = store.files()
    if MANIFEST_NAME not in remote:
        hint = " (a dump is unfinished: rerun teacher-dump to complete it)" if FINGERPRINT_NAME in remote else ""
        what = "does not exist" if not remote else f"is not a finished kdpipe cache: no {MANIFEST_NAME}"
        raise KdpipeError(f"cache {url} {what}{hint}")
    base = kdpipe_home() / "mirror"
    base.mkdir(parents=True, exist_ok=True)
    _remove_dead_mirrors(base)
    root = Path(tempfile.mkdtemp(prefix=f"cache-{os.getpid()}-", dir=base)).resolve()
    atexit.register(shutil.rmtree, root, True)
    store.get_many(sorted(r for r in remote if not r.startswith(f"{SHARDS_DIR}/")), root)  # small files
    (root / SHARDS_DIR).mkdir(exist_ok=True)
    budget = int(float(os.environ.get("KDPIPE_SHARD_CACHE_MB", "2048")) * (1 << 20))
    cachedir.register_remote(root, RemoteShards(store, root, remote, budget))
    _display[str(root)] = store.url
    return root


_display: dict[str, str] = {}  # mirror folder -> the URL it stands for


def release_mirror(root: Path) -> None:
    """Remove a mirror folder and forget it (its process is done reading)."""
    from kdpipe.pipeline import cache as cachedir

    cachedir._remote.pop(Path(root).resolve(), None)
    _display.pop(str(root), None)
    shutil.rmtree(root, ignore_errors=True)


def display(path: Path) -> str:
    """How to record a cache location: its URL for a mirror, else the absolute path."""
    return _display.get(str(Path(path).resolve()), str(Path(path).resolve()))


# ------------------------------------------------------------------------------------ the hooks

def _rewrite(text: str, names: dict[str, str]) -> str:
    for local, url in names.items():
        text = text.replace(local, url)
    return text


def staged(cfg: Any, stage: Callable[[Any], dict[str, Any]], reads: tuple[str, ...] = (),
           writes: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `stage` with its URL locations replaced by local folders: caches it reads (`reads`:
    config fields) mirrored, outputs it writes (`writes`: field -> a kind of KINDS) staged and
    published. file:// URLs become plain paths. Messages and the summary name the URLs."""
    mirrors: list[Path] = []
    try:
        return _staged(cfg, stage, reads, writes or {}, mirrors)
    finally:
        for root in mirrors:
            release_mirror(root)


def _staged(cfg: Any, stage: Callable[[Any], dict[str, Any]], reads: tuple[str, ...],
            writes: dict[str, str], mirrors: list[Path]) -> dict[str, Any]:
    updates: dict[str, str] = {}
    names: dict[str, str] = {}
    jobs: list[tuple[Publisher, Path]] = []
    reused = 0
    for field in reads:
        loc = getattr(cfg, field)
        if is_url(loc) and scheme(loc) == "file":
            updates[field] = file_url_path(loc)
        elif is_url(loc):
            mirrors.append(mirror_cache(loc))
            updates[field] = str(mirrors[-1])
            names[updates[field]] = loc.rstrip("/")
    for field, kind in writes.items():
        loc = getattr(cfg, field)
        if not is_url(loc):
            continue
        if scheme(loc) == "file":
            updates[field] = file_url_path(loc)
            continue
        prepare, commit, what = KINDS[kind]
        store = Store(loc, what)
        staging = staging_dir(kind, store.url)
        with exclusive_lock(staging, f"{kind} staging folder for {loc}"):
            try:
                sent, n = prepare(store, staging)
            except KdpipeError as e:
                raise type(e)(_rewrite(str(e), {str(staging): loc})) from None
        reused += n
        jobs.append((Publisher(staging, store, commit, sent), staging))
        updates[field] = str(staging)
        names[str(staging)] = store.url
    local_cfg = cfg.model_copy(update=updates)
    for pub, _ in jobs:
        pub.start()
    try:
        result = stage(local_cfg)
    except KdpipeError as e:
        raise type(e)(_rewrite(str(e), names)) from None
    finally:
        for pub, _ in jobs:
            pub.stop()
    for pub, staging in jobs:
        pub.finish()
        shutil.rmtree(staging, ignore_errors=True)  # published; a rerun starts from the store
    out = json.loads(_rewrite(json.dumps(result), names))
    if reused:
        out["reused_from_store"] = reused
    return out


@contextmanager
def local_cache(loc: str) -> Iterator[Path]:
    """A cache location (path or URL) as a local folder for reading; a mirror is removed after."""
    if not is_url(loc):
        yield Path(loc)
    elif scheme(loc) == "file":
        yield Path(file_url_path(loc))
    else:
        root = mirror_cache(loc)
        try:
            yield root
        except KdpipeError as e:
            raise type(e)(_rewrite(str(e), {str(root): loc.rstrip("/")})) from None
        finally:
            release_mirror(root)
