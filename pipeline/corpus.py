"""Text in, packed token-id sequences out, streamed so memory stays flat in the corpus size.

What `--data` reads: text files (one document per line; any extension that is not one of the
others, so a `.cor` corpus needs no renaming), JSON lines, Parquet, CSV/TSV (a text column), each
also compressed (.gz, .bz2, .xz, .zst); a `save_to_disk` folder (Dataset or DatasetDict: --data-split
picks the split); a local dataset repository folder (a README.md whose YAML front matter
`datasets` reads, beside its data files); globs and plain folders of files; the name of a dataset
available offline. `--format` says what a file is where its name does not.

Sequence ids are positions in this deterministic stream: the same corpus, tokenizer, length and
packing give the same sequence for the same id, which is what lets a shard be redone alone.
"""

from __future__ import annotations


import codecs
import glob
import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kdpipe.pipeline.errors import KdpipeError

Packing = Literal["pack", "line"]
_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet",
             ".csv": "csv", ".tsv": "tsv"}
_COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
# --format: what a --data file or folder is (auto: from its name, or what a folder holds)
FORMATS = ("auto", "text", "json", "parquet", "csv", "tsv", "disk", "repo")
_FOLDER_FORMATS = ("disk", "repo")
_TOKENIZE_BATCH = 512
_LONG_TEXT = 1 << 16  # characters: longer documents are tokenized in pieces


@dataclass(frozen=True)
class Corpus:
    """A resolved corpus: local files of one format, or a dataset name available offline."""

    builder: str  # text | json | parquet | a dataset name
    files: tuple[Path, ...] = ()
    config_name: str | None = None
    split: str = "train"
    text_column: str = "text"
    fingerprint: dict[str, Any] = field(default_factory=dict)


def _expand(sources: Iterable[str]) -> list[Path]:
    files: list[Path] = []
    for s in sources:
        matches = sorted(glob.glob(s)) if any(c in s for c in "*?[") else [s]
        for m in matches:
            p = Path(m)
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    return files


def _suffix(path: Path) -> str:
    """The format suffix, under any compression suffix: a.txt.gz -> .txt."""
    name = path.name.lower()
    for c in _COMPRESSION:
        if name.endswith(c):
            name = name[: -len(c)]
    return Path(name).suffix


def _open_text_bytes(path: Path) -> Any:
    """The file's bytes, decompressed by its suffix (for the UTF-8 check)."""
    kind = _COMPRESSION.get(path.suffix.lower())
    if kind == "gzip":
        import gzip

        return gzip.open(path, "rb")
    if kind == "bz2":
        import bz2

        return bz2.open(path, "rb")
    if kind == "xz":
        import lzma

        return lzma.open(path, "rb")
    if kind == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return None


def _hash_and_check(path: Path, builder: str) -> dict[str, Any]:
    """SHA-256 of a file (as stored), checking on the way that a text file decodes as UTF-8
    (once decompressed: a compressed file is read twice)."""
    h = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")() if builder != "parquet" else None
    size = 0
    try:
        if decoder is not None and path.suffix.lower() in _COMPRESSION:
            _check_utf8(path)
            decoder = None
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
                if decoder is not None:
                    try:
                        decoder.decode(block)
                    except UnicodeDecodeError as e:
                        raise KdpipeError(
                            f"corpus file {path} is not valid UTF-8 (byte offset {size + e.start})"
                        ) from None
                size += len(block)
            if decoder is not None:
                decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise KdpipeError(f"corpus file {path} ends in the middle of a UTF-8 character") from None
    except PermissionError:
        raise KdpipeError(f"corpus file {path} is not readable (permission denied)") from None
    return {"name": path.name, "bytes": size, "sha256": h.hexdigest()}


def _check_utf8(path: Path) -> None:
    decoder, at = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        with _open_text_bytes(path) as f:
            while block := f.read(1 << 20):
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as e:
                    raise KdpipeError(f"corpus file {path} is not valid UTF-8 once decompressed "
                                      f"(byte offset {at + e.start})") from None
                at += len(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise KdpipeError(f"corpus file {path} ends in the middle of a UTF-8 character") from None
    except (OSError, EOFError, ValueError) as e:
        if isinstance(e, KdpipeError):
            raise
        raise KdpipeError(f"corpus file {path} cannot be decompressed: {e}") from None


def folder_format(path: Path) -> str | None:
    """disk (a save_to_disk folder), repo (a dataset repository: README.md with YAML front
    matter) or None (a plain folder of files)."""
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "disk"
    readme = path / "README.md"
    if readme.is_file():
        with open(readme, encoding="utf-8", errors="replace") as f:
            if f.readline().strip() == "---":
                return "repo"
    return None

def looks_like_path(spec: str) -> bool:
    """A spec meant as a local file (so a missing one is 'not found', not a dataset lookup)."""
    return (spec.startswith(("/", "./", "../", "~")) or _suffix(Path(spec)) in _BUILDERS
            or Path(spec).suffix.lower() in _COMPRESSION)


def resolve_corpus(sources: Iterable[str], text_column: str = "text", split: str = "train",
                   data_format: str = "auto") -> Corpus:
    """Local files (see the module docstring; globs and folders allowed), a save_to_disk or
    dataset repository folder, or a dataset name."""
    if data_format not in FORMATS:
        raise KdpipeError(f"unknown --format {data_format!r} (choose from {', '.join(FORMATS)})")
    sources = list(sources)
    if not sources:
        raise KdpipeError("no corpus given (--data)")
    resolved = []
    for s in sources:
        if s.startswith("builtin:"):
            from kdpipe.pipeline import builtin

            s = builtin.resolve(s, "data")
        resolved.append(s)
    local = [s for s in resolved if os.path.exists(s) or any(c in s for c in "*?[")]
    if local and len(local) != len(resolved):
        missing = sorted(set(resolved) - set(local))
        raise KdpipeError(f"corpus file(s) not found: {', '.join(missing)}")
    if not local:
        if len(resolved) != 1 or looks_like_path(resolved[0]):
            raise KdpipeError(f"corpus file(s) not found: {', '.join(resolved)}")
        if data_format in _FOLDER_FORMATS:
            raise KdpipeError(f"--format {data_format} needs a folder; {resolved[0]} does not exist")
        return _dataset_corpus(resolved[0], text_column, split)
    folders = {s: data_format if data_format in _FOLDER_FORMATS else folder_format(Path(s))
               for s in local if Path(s).is_dir()}
    if any(folders.values()) or data_format in _FOLDER_FORMATS:
        if len(local) != 1 or not folders:
            raise KdpipeError(f"a save_to_disk or dataset repository folder is read alone: give it as the "
                              f"only --data ({', '.join(local)})")
        return _folder_corpus(Path(local[0]), folders[local[0]], text_column, split)
    files = _expand(local)
    if not files:
        raise KdpipeError(f"no corpus files match {', '.join(local)}")
    # a name that is no other format is plain text (checked as UTF-8 below)
    kinds = {data_format if data_format != "auto" else _BUILDERS.get(_suffix(p), "text") for p in files}
    if len(kinds) > 1:
        raise KdpipeError(f"corpus files must all be of one format (these are {', '.join(sorted(kinds))}); "
                          "give --format to read them all as one")
    builder = kinds.pop()
    fps = [_hash_and_check(p, builder) for p in files]
    if sum(f["bytes"] for f in fps) == 0:
        raise KdpipeError(f"corpus is empty: {', '.join(str(p) for p in files)}")
    fingerprint = {"format": builder, "files": fps, "text_column": text_column}
    return Corpus(builder, tuple(files), None, "train", text_column, fingerprint)


def _folder_corpus(path: Path, kind: str, text_column: str, split: str) -> Corpus:
    """A save_to_disk folder (disk) or a dataset repository folder (repo), every file hashed."""
    files = sorted(q for q in path.rglob("*") if q.is_file() and ".cache" not in q.relative_to(path).parts)
    fps = [{**_hash_and_check(q, "parquet"), "name": q.relative_to(path).as_posix()} for q in files]
    if kind == "disk" and (path / "dataset_dict.json").is_file():
        splits = read_splits(path)
        if split not in splits:
            raise KdpipeError(f"dataset {path} has no split {split!r} (splits: {', '.join(splits)}); "
                              "set --data-split")
    fingerprint = {"format": kind, "files": fps, "split": split, "text_column": text_column}
    return Corpus(kind, (path,), None, split, text_column, fingerprint)


def read_splits(path: Path) -> list[str]:
    import json

    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
    except (OSError, ValueError, AttributeError):
        raise KdpipeError(f"{path / 'dataset_dict.json'} is not a readable save_to_disk index") from None
    return [str(x) for x in splits]


def _dataset_corpus(name: str, text_column: str, split: str) -> Corpus:
    repo, _, config = name.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # datasets raises many types for "not found offline"
        raise KdpipeError(
            f"corpus {name!r} is neither a local file nor a dataset available offline ({e})"
        ) from None
    fingerprint = {"format": "dataset", "name": repo, "config": config or None, "split": split,
                   "dataset_fingerprint": getattr(ds, "_fingerprint", None), "text_column": text_column}
    return Corpus(repo, (), config or None, split, text_column, fingerprint)


def iter_texts(corpus: Corpus) -> Iterator[str]:
    """Documents (non-blank strings) in corpus order, streamed through `datasets`."""
    import datasets

    datasets.disable_progress_bars()
    if corpus.builder == "disk":
        ds = datasets.load_from_disk(str(corpus.files[0]))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[corpus.split]
    elif corpus.builder == "repo":
        ds = datasets.load_dataset(str(corpus.files[0]), split=corpus.split, streaming=True)
    elif corpus.files:
        builder, extra = ("csv", {"delimiter": "\t"}) if corpus.builder == "tsv" else (corpus.builder, {})
        ds = datasets.load_dataset(
            builder, data_files=[str(p) for p in corpus.files], split="train", streaming=True, **extra
        )
    else:
        ds = datasets.load_dataset(corpus.builder, corpus.config_name, split=corpus.split)
    column = corpus.text_column
    try:
        for row in ds:  # a save_to_disk Dataset is memory-mapped: rows are read as they are needed
            if column not in row:
                raise KdpipeError(
                    f"corpus has no column {column!r} (columns: {', '.join(row)}); set --text-column"
                )
            text = row[column]
            if isinstance(text, str) and text.strip():
                yield text
    except (ValueError, TypeError, OSError) as e:
        if isinstance(e, KdpipeError):
            raise
        raise KdpipeError(f"cannot read corpus: {e}") from None


def _pieces(text: str) -> list[str]:
    """A long document cut before whitespace into pieces of at most _LONG_TEXT characters, so the
    tokenizer never holds one enormous encoding (a 20 MB line took 3 GB); whitespace is a token
    boundary, so the pieces' ids joined are the document's. A run of _LONG_TEXT characters without
    whitespace is cut where it is (such a "word" is [UNK] either way)."""
    out, start = [], 0
    while len(text) - start > _LONG_TEXT:
        window = text[start + _LONG_TEXT // 2:start + _LONG_TEXT]
        at = max(window.rfind(c) for c in " \t\n\r\f\v")
        cut = start + _LONG_TEXT // 2 + at if at >= 0 else start + _LONG_TEXT
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def iter_token_docs(texts: Iterable[str], tokenizer: Any) -> Iterator[list[int]]:
    """Token ids of each document, without special tokens, tokenized in batches."""
    for _, ids in indexed_token_docs(enumerate(texts), tokenizer):
        yield ids


def indexed_token_docs(texts: Iterable[tuple[int, str]], tokenizer: Any) -> Iterator[tuple[int, list[int]]]:
    """(index, token ids) of each (index, document) whose ids are not empty, tokenized in
    batches of _TOKENIZE_BATCH documents (one fast-tokenizer call each)."""
    batch: list[tuple[int, str]] = []
    for i, text in texts:
        if len(text) > _LONG_TEXT:
            if batch:  # keep the corpus order
                yield from _encode(tokenizer, batch)
                batch = []
            ids = [t for piece in _pieces(text) for _, doc in _encode(tokenizer, [(i, piece)]) for t in doc]
            if ids:
                yield i, ids
            continue
        batch.append((i, text))
        if len(batch) == _TOKENIZE_BATCH:
            yield from _encode(tokenizer, batch)
            batch = []
    if batch:
        yield from _encode(tokenizer, batch)


def _encode(tokenizer: Any, batch: list[tuple[int, str]]) -> Iterator[tuple[int, list[int]]]:
    enc = tokenizer([text for _, text in batch], add_special_tokens=False, return_attention_mask=False,
                    return_token_type_ids=False, verbose=False)
    for (i, _), ids in zip(batch, enc["input_ids"]):
        if ids:
            yield i, ids


class Packer:
    """`pack`'s state between documents: the tokens carried over to the next sequence (fewer than
    seq_len - 2 of them; none in line mode). Packing restarted at any document with the carry it
    had there cuts the same sequences (pipeline/corpus_index.py relies on it)."""

    def __init__(self, seq_len: int, cls_id: int, sep_id: int, mode: Packing = "pack",
                 carry: Iterable[int] = ()) -> None:
        self.body = seq_len - 2
        if self.body < 1:
            raise KdpipeError(f"sequence length {seq_len} leaves no room between [CLS] and [SEP]")
        self.cls_id, self.sep_id, self.mode = cls_id, sep_id, mode
        self.buf: list[int] = list(carry)

    @property
    def carry(self) -> tuple[int, ...]:
        return tuple(self.buf)

    def feed(self, ids: list[int]) -> Iterator[np.ndarray]:
        """The sequences completed by one more document (consume them before the next feed)."""
        body, cls_id, sep_id = self.body, self.cls_id, self.sep_id
        if self.mode == "line":
            for i in range(0, len(ids), body):
                yield np.array([cls_id, *ids[i:i + body], sep_id], dtype=np.int64)
            return
        buf = self.buf
        if buf:
            buf.append(sep_id)
        buf.extend(ids)
        start = 0  # cut by offset: one enormous document stays linear, not quadratic
        while len(buf) - start >= body:
            yield np.array([cls_id, *buf[start:start + body], sep_id], dtype=np.int64)
            start += body
        del buf[:start]

    def finish(self) -> Iterator[np.ndarray]:
        """The last, shorter sequence, if tokens are left over."""
        if self.buf:
            yield np.array([self.cls_id, *self.buf, self.sep_id], dtype=np.int64)


def pack(docs: Iterable[list[int]], seq_len: int, cls_id: int, sep_id: int,
         mode: Packing = "pack") -> Iterator[np.ndarray]:
    """[CLS] tokens [SEP] sequences of at most `seq_len` tokens.

    pack: documents are joined with [SEP] and cut into full-length sequences, so no compute is
    spent on padding (the last sequence may be short). line: one document per sequence (long
    ones split), for corpora where a sequence must not span documents; batches are then
    bucketed by length.
    """
    packer = Packer(seq_len, cls_id, sep_id, mode)
    for ids in docs:
        yield from packer.feed(ids)
    yield from packer.finish()


def iter_sequences(corpus: Corpus, tokenizer: Any, seq_len: int, mode: Packing) -> Iterator[np.ndarray]:
    """The corpus as a deterministic stream of packed sequences; the index is the sequence id."""
    return pack(iter_token_docs(iter_texts(corpus), tokenizer), seq_len,
                tokenizer.cls_token_id, tokenizer.sep_token_id, mode)
