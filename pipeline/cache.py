"""A cache directory: its layout, fingerprint guard, manifest (the commit point) and checks.

    CACHE_DIR/
      fingerprint.json        settings the cache depends on; written first, guards a resume
      run_info.json           resolved config, package versions, code revision
      teacher_config.json     the teacher's config (a student can be built without the teacher)
      projection.safetensors  the hidden-state projection (H, d) (all modes but none), and with
                              --hidden-layers each other layer's, (n, H, d) under "layers"
      head.safetensors        the frozen decoder, weight (V, H') and bias (V,) (exact mode)
      tokenizer/              the teacher's tokenizer files (a student run needs no teacher)
      shards/shard-NNNNN.parquet
      manifest.json           written last; lists every shard with rows, bytes and SHA-256
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from kdpipe.pipeline.errors import CacheMismatchError, CorruptCacheError, KdpipeError, validate_record
from kdpipe.pipeline.fsutil import dumps_json, read_hashed, read_json, safe_join, sha256_bytes, sha256_file
from kdpipe.pipeline.shards import read_fingerprint
from kdpipe.schemas.manifest import (  # noqa: F401  (the layout's names, used as cachedir.NAME)
    FINGERPRINT_NAME, HEAD_NAME, MANIFEST_NAME, MANIFEST_VERSION, PROJECTION_NAME, RUN_INFO_NAME,
    SHARDS_DIR, TEACHER_CONFIG_NAME, TOKENIZER_DIR, FileEntry, Manifest, ShardEntry,
)
from kdpipe.schemas.shard import SCHEMA_VERSION


def fingerprint_sha256(fingerprint: dict[str, Any]) -> str:
    return sha256_bytes(dumps_json(fingerprint))


def diff_fingerprints(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences, one 'key: old -> new' per leaf."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(diff_fingerprints(a, b, name + "."))
        elif a != b:
            out.append(f"{name}: {_short(a)} -> {_short(b)}")
    return out


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 80 else s[:77] + "..."


def check_fingerprint(cache_dir: Path, fingerprint: dict[str, Any]) -> bool:
    """True if the directory already holds (part of) a cache with these settings; raises if it
    holds one with other settings, naming every difference."""
    path = cache_dir / FINGERPRINT_NAME
    if not path.exists():
        if (cache_dir / MANIFEST_NAME).exists():
            raise KdpipeError(f"{cache_dir} has a manifest but no {FINGERPRINT_NAME}; not a kdpipe cache")
        return False
    old = read_json(path)
    diffs = diff_fingerprints(old, fingerprint)
    if diffs:
        raise CacheMismatchError(
            f"{cache_dir} holds a cache made with other settings; refusing to add to it "
            f"({'; '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}). Use another --out."
        )
    return True


def file_entry(cache_dir: Path, name: str) -> FileEntry:
    return FileEntry(path=name, sha256=sha256_file(cache_dir / name))


def load_manifest(cache_dir: Path) -> Manifest:
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise KdpipeError(f"cache {cache_dir} does not exist or is not a directory")
    path = cache_dir / MANIFEST_NAME
    if not path.is_file():
        hint = " (a dump is unfinished: rerun teacher-dump to complete it)" if (
            cache_dir / FINGERPRINT_NAME).exists() else ""
        raise KdpipeError(f"{cache_dir} is not a finished kdpipe cache: no {MANIFEST_NAME}{hint}")
    raw = read_json(path)
    if isinstance(raw, dict) and raw.get("format_version", MANIFEST_VERSION) != MANIFEST_VERSION:
        raise KdpipeError(f"{path}: manifest format version {raw.get('format_version')} is not "
                          f"supported by this kdpipe (reads version {MANIFEST_VERSION})")
    m = validate_record(Manifest, raw, str(path), CorruptCacheError)
    if m.schema_version != SCHEMA_VERSION:  # one shard layout is read: an older cache is re-dumped
        raise KdpipeError(f"cache {cache_dir} holds shards of schema version {m.schema_version}; this kdpipe "
                          f"reads version {SCHEMA_VERSION} only (schemas/shard.py says why): re-dump it with "
                          "`kdpipe teacher-dump` into a new --out")
    if fingerprint_sha256(m.fingerprint) != m.fingerprint_sha256:
        raise CorruptCacheError(f"{path}: the fingerprint does not match its recorded hash")
    problems = _inconsistencies(m)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CorruptCacheError(f"{path} was edited or is damaged: {problems[0]}{more}")
    for entry in listed_files(m):
        safe_join(cache_dir, entry.path)
    _expected_fingerprint[cache_dir.resolve()] = m.fingerprint_sha256
    return m


# cache folder -> the fingerprint hash its manifest names (set by load_manifest): every shard's footer
# must carry it, or the manifest was edited (and re-hashed) or the shard belongs to another cache
_expected_fingerprint: dict[Path, str] = {}


def _inconsistencies(m: Manifest) -> list[str]:
    """Fields the manifest repeats (from its fingerprint, or as sums over its shards) must agree;
    a hand-edited summary (top_k, say) would otherwise mislead every reader of the cache."""

    def fp(*keys: str) -> Any:
        d: Any = m.fingerprint
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    out = []
    for field, want in (("schema_version", fp("schema_version")), ("vocab_size", fp("teacher", "vocab_size")),
                        ("seq_len", fp("sequences", "seq_len")), ("top_k", fp("targets", "k")),
                        ("temperatures", fp("targets", "temperatures")), ("hidden_dim", fp("hidden", "dim")),
                        ("sequences", fp("sequences", "count")), ("targets", fp("targets", "mode")),
                        ("target_positions", fp("targets", "positions")), ("samples", fp("targets", "samples"))):
        if want is not None and getattr(m, field) != want:
            out.append(f"{field} is {getattr(m, field)!r} but the fingerprint says {want!r}")
    if m.hidden_layers != (fp("hidden", "layers") or []):
        out.append(f"hidden_layers is {m.hidden_layers!r} but the fingerprint says {fp('hidden', 'layers') or []!r}")
    stored = fp("relation")
    if (m.relation is None) != (stored is None) or (m.relation is not None and stored != {
            "layer": m.relation.layer, "parts": m.relation.parts}):
        held = None if m.relation is None else {"layer": m.relation.layer, "parts": m.relation.parts}
        out.append(f"relation is {held!r} but the fingerprint says {stored!r}")
    for field in ("sequences", "rows", "tokens", "bytes"):
        total = sum(getattr(e, "num_seqs" if field == "sequences" else field) for e in m.shards)
        if getattr(m, field) != total:
            out.append(f"{field} is {getattr(m, field)} but the listed shards add up to {total}")
    size, views = fp("storage", "shard_size"), fp("masking", "views") or 1
    for i, e in enumerate(m.shards):
        if e.index != i or (size is not None and e.first_seq != i * size):
            out.append(f"shard entry {i} ({e.path}) is out of place (index {e.index}, first_seq {e.first_seq})")
        elif e.rows != e.num_seqs * views:
            out.append(f"shard entry {i} ({e.path}) has {e.rows} rows for {e.num_seqs} sequences x {views} views")
    return out


def listed_files(m: Manifest) -> list[ShardEntry | FileEntry]:
    """Every file the manifest vouches for."""
    extra = [e for e in (m.projection, m.head) if e is not None]
    return [m.teacher_config, *extra, *m.tokenizer, *m.shards]


@dataclass(frozen=True)
class Problem:
    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


# Caches read from a store (pipeline.storage): their local folder -> the fetcher that brings a shard
# into it when first opened. The manifest and small files are local already.
_remote: dict[Path, Any] = {}


def register_remote(root: Path, fetcher: Any) -> None:
    _remote[Path(root).resolve()] = fetcher


def _fetcher(cache_dir: Path) -> Any | None:
    return _remote.get(Path(cache_dir).resolve()) if _remote else None


def check_file(cache_dir: Path, entry: ShardEntry | FileEntry, data: bytes | memoryview | None = None,
               path: Path | None = None, digest: str | None = None) -> Problem | None:
    """Size (for shards) and SHA-256 of one listed file against the manifest; `data`: the file's
    bytes, read already (they are what is hashed and whose footer is read, not the file again),
    `digest` their SHA-256 where the reader hashed them as it read; `path`: its path as
    `safe_join` resolved it already."""
    path = path or safe_join(cache_dir, entry.path)
    if data is None and isinstance(entry, ShardEntry) and (fetcher := _fetcher(cache_dir)) is not None:
        fetcher.fetch(entry.path)
    if data is None and not path.is_file():
        return Problem(entry.path, "missing")
    size = len(data) if data is not None else path.stat().st_size
    if isinstance(entry, ShardEntry) and size != entry.bytes:
        return Problem(entry.path, f"size {size} bytes, manifest says {entry.bytes}")
    digest = digest or (sha256_bytes(data) if data is not None else sha256_file(path))
    if digest != entry.sha256:
        return Problem(entry.path, f"SHA-256 {digest[:12]}..., manifest says {entry.sha256[:12]}...")
    want = _expected_fingerprint.get(Path(cache_dir).resolve()) if isinstance(entry, ShardEntry) else None
    if want is not None:
        try:
            got = read_fingerprint(path if data is None else pa.BufferReader(data))
        except Exception as e:  # pyarrow's many kinds: not a readable Parquet footer
            return Problem(entry.path, f"its Parquet footer cannot be read ({type(e).__name__})")
        if got != want:
            return Problem(entry.path, f"its footer carries the fingerprint {str(got)[:12]}..., the manifest "
                                       f"says {want[:12]}... (the manifest was edited, or the shard is another "
                                       "cache's)")
    return None


def verify_cache(cache_dir: Path) -> tuple[Manifest, list[Problem]]:
    """Every listed file against the manifest, plus shard files the manifest does not list."""
    cache_dir = Path(cache_dir)
    m = load_manifest(cache_dir)
    entries = listed_files(m)
    problems = [p for e in entries if (p := check_file(cache_dir, e))]
    listed = {e.path for e in m.shards}
    fetcher = _fetcher(cache_dir)
    present = fetcher.shard_files() if fetcher is not None else [
        f.relative_to(cache_dir).as_posix() for f in sorted((cache_dir / SHARDS_DIR).glob("*.parquet"))]
    for rel in present:
        if rel not in listed:
            problems.append(Problem(rel, "not listed in the manifest (ignored by readers)"))
    return m, problems


def check_shard_sizes(cache_dir: Path, manifest: Manifest) -> None:
    """Every listed shard exists at the size the manifest says (cheap: no hashing, no download)."""
    fetcher = _fetcher(cache_dir)
    for entry in manifest.shards:
        path = safe_join(cache_dir, entry.path)
        if fetcher is not None:
            size = fetcher.sizes.get(entry.path)
        else:
            size = path.stat().st_size if path.is_file() else None
        if size != entry.bytes:
            raise CorruptCacheError(f"corrupt cache: {path} is missing or not the size the manifest says; "
                                    "run `kdpipe cache verify`")


# Shards this process has hashed, by (path, hash, size, mtime, inode): a multi-epoch run hashes each
# shard once, not once per epoch; any rewrite of the file changes the key and is hashed again.
_verified: set[tuple[str, str, int, int, int]] = set()


def open_shard(cache_dir: Path, entry: ShardEntry) -> Path:
    """A listed shard's path, checked against the manifest before any of it is used."""
    path, _ = shard_source(cache_dir, entry, keep=False)
    return path


def shard_source(cache_dir: Path, entry: ShardEntry, keep: bool = True, buffer: bytearray | None = None
                 ) -> tuple[Path, bytes | memoryview | None]:
    """A listed shard's path and, with `keep`, its bytes: read once, hashed and checked against the
    manifest before any of it is used, so the reader parses what was hashed (no second read of the
    file, no window for it to change in between). None instead of the bytes where this process
    checked this very file before (same path, hash, size, mtime and inode): read it from the path.
    `buffer` (at least the shard's size): read into it and hashed as read (`fsutil.read_hashed`);
    the view returned is valid until the caller reuses the buffer."""
    path = safe_join(cache_dir, entry.path)
    if (fetcher := _fetcher(cache_dir)) is not None:
        fetcher.fetch(entry.path)  # a cache on a store: bring the shard here first
    try:
        st = path.stat()
        key = (str(path), entry.sha256, st.st_size, st.st_mtime_ns, st.st_ino)
    except OSError:
        key = None
    if key is not None and key in _verified:
        return path, None
    data, digest = None, None
    if keep and key is not None and key[2] == entry.bytes:  # the size the manifest says: worth reading
        if buffer is not None:
            data, digest = read_hashed(path, entry.bytes, buffer)
        else:
            with open(path, "rb") as f:
                data = f.read()
    problem = check_file(cache_dir, entry, data, path, digest)
    if problem:
        raise CorruptCacheError(f"corrupt cache: {Path(cache_dir) / problem.path}: {problem.what}; "
                                "run `kdpipe cache verify` and re-dump the shard")
    if key is not None:
        _verified.add(key)
    return path, data
