"""Semantic corruption of a finished cache, re-hashed so that its bytes still verify.

Each kind rewrites one value (or one count, or one fingerprint) of a randomly chosen shard, row
and column, writes the shard again with kdpipe's own encoding and footer, and updates the
manifest's SHA-256, sizes and totals: `cache verify` without --deep must find nothing wrong with
the bytes, so whatever refuses the cache afterwards refuses it for its meaning. Used by the tests
and by `bench/faults.py --fault semantic`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

KINDS = ("nan", "inf", "id", "label", "position", "count", "fingerprint")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rehash(cache: Path, manifest: dict[str, Any]) -> None:
    for e in manifest["shards"]:
        p = cache / e["path"]
        e["sha256"], e["bytes"] = _sha(p), p.stat().st_size
    manifest["bytes"] = sum(e["bytes"] for e in manifest["shards"])
    (cache / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _write(path: Path, table: pa.Table, fingerprint: str) -> None:
    from kdpipe.pipeline.shards import write_shard

    write_shard(path, table.replace_schema_metadata(None), fingerprint, 3)


def _set_cell(table: pa.Table, column: str, data: Any, rng: random.Random, value: Any) -> tuple[pa.Table, int]:
    """`table` with one random entry of `column` replaced by `value`; returns the row it is in."""
    from kdpipe.pipeline.shards import to_table

    arr = getattr(data, column)
    flat = arr.reshape(len(arr), -1)
    i, j = rng.randrange(flat.shape[0]), rng.randrange(flat.shape[1])
    flat[i, j] = value
    if column in ("input_ids", "hidden", "hidden_layers", "relation"):
        offsets = data.offsets()
    elif column in ("mlm_labels", "mlm_positions"):
        offsets = data.mlm_offsets()
    else:
        offsets = data.target_offsets()
    row = int(np.searchsorted(offsets, i, side="right") - 1)
    return to_table(data, table.schema), row


def corrupt(cache: Path, kind: str, rng: random.Random) -> dict[str, Any]:
    """Apply one semantic fault of `kind` to `cache` (in place); returns what was done."""
    from kdpipe.pipeline.shards import from_table, read_fingerprint

    manifest = json.loads((cache / "manifest.json").read_text())
    vocab = int(manifest["vocab_size"])
    if kind == "fingerprint":
        if rng.random() < 0.5:  # the manifest names other settings, its own hash made to agree
            from kdpipe.pipeline.cache import fingerprint_sha256

            manifest["fingerprint"]["masking"]["seed"] += 1 + rng.randrange(1000)
            manifest["fingerprint_sha256"] = fingerprint_sha256(manifest["fingerprint"])
            _rehash(cache, manifest)
            return {"kind": kind, "what": "manifest fingerprint edited and re-hashed"}
        entry = rng.choice(manifest["shards"])  # one shard's footer swapped for another cache's
        path = cache / entry["path"]
        _write(path, pq.read_table(path), hashlib.sha256(str(rng.random()).encode()).hexdigest())
        _rehash(cache, manifest)
        return {"kind": kind, "what": f"{entry['path']} footer fingerprint swapped"}
    entry = rng.choice([e for e in manifest["shards"] if e["rows"]])
    path = cache / entry["path"]
    fp = read_fingerprint(path)
    table = pq.read_table(path)
    data = from_table(table)
    for f in dataclasses.fields(data):  # decoded arrays are read-only views of Arrow buffers
        if isinstance(v := getattr(data, f.name), np.ndarray):
            setattr(data, f.name, v.copy())
    if kind in ("nan", "inf"):
        columns = [c for c in ("hidden", "hidden_layers", "relation", "topk_logits", "log_z", "teacher_state")
                   if getattr(data, c) is not None]
        column = rng.choice(columns)
        value = float("nan") if kind == "nan" else rng.choice([float("inf"), float("-inf")])
        table, row = _set_cell(table, column, data, rng, value)
    elif kind in ("id", "label"):
        columns = ["mlm_labels"] if kind == "label" else \
            [c for c in ("input_ids", "topk_ids", "sample_ids") if getattr(data, c) is not None]
        column = rng.choice(columns)
        if not getattr(data, column).size:
            return corrupt(cache, kind, rng)  # a shard without masked positions: another one
        table, row = _set_cell(table, column, data, rng, rng.choice([vocab, min(65535, vocab + 7), 65535]))
    elif kind == "position":
        column = "mlm_positions"
        if not data.mlm_positions.size:
            return corrupt(cache, kind, rng)
        i = rng.randrange(len(data.mlm_positions))
        row = int(np.searchsorted(data.mlm_offsets(), i, side="right") - 1)
        data.mlm_positions[i] = rng.choice([int(data.length[row]), int(data.length[row]) + 5, 65535])
        from kdpipe.pipeline.shards import to_table

        table = to_table(data, table.schema)
    elif kind == "count":  # a row's `length` no longer agrees with its lists (or one list with another)
        row = rng.randrange(data.rows)
        column = rng.choice(["length", "mlm_labels"])
        if column == "length":
            lengths = data.length.astype(np.int64)
            lengths[row] += rng.choice([-1, 1, 3])
            table = table.set_column(table.schema.get_field_index("length"), table.schema.field("length"),
                                     pa.array(lengths.astype(np.uint16), pa.uint16()))
        else:  # one label dropped from (or added to) one row
            labels = table.column("mlm_labels").to_pylist()
            labels[row] = labels[row][:-1] if labels[row] else [0]
            table = table.set_column(table.schema.get_field_index("mlm_labels"), table.schema.field("mlm_labels"),
                                     pa.array(labels, table.schema.field("mlm_labels").type))
    else:
        raise ValueError(f"unknown kind {kind!r}")
    _write(path, table, fp)
    _rehash(cache, manifest)
    return {"kind": kind, "what": f"{entry['path']} row {row} {column}"}
