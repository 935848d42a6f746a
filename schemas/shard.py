"""The Arrow schema of a cache shard: one row per (sequence, mask view).

Version 3. Per-token columns hold `length` entries (padding is never stored); target columns hold
one entry per target position: every token (positions "all") or the masked ones, in the order of
`mlm_positions` (positions "masked", the reference's restrict_ce_to_mask). Ids are uint16 when
the vocabulary fits in 16 bits, else uint32; stored activations are float16; log-partition
values float32 (their error would otherwise shift every probability).

Columns of fixed-width vectors (one per token or target position: hidden, hidden_layers, relation, topk_ids,
topk_logits, log_z, teacher_state) are *vector columns*: one `large_binary` value per row holding the row's
(entries, width) array, C order, little-endian, with the dtype and width in the field's metadata
(`kdpipe.dtype`, `kdpipe.width`). Decoding a row is `np.frombuffer(value, dtype).reshape(-1, width)`;
decoding a whole column chunk is one `np.frombuffer` on its data buffer, no copy.

| column        | type                                  | per     | meaning                                        |
|---------------|---------------------------------------|---------|------------------------------------------------|
| seq_id        | uint64                                | row     | position of the sequence in the packed corpus  |
| view          | uint16                                | row     | which independent mask draw                    |
| length        | uint16                                | row     | tokens, [CLS] and [SEP] included               |
| input_ids     | list<id>                              | token   | the input as the teacher saw it (masked)       |
| mlm_positions | list<uint16>                          | masked  | masked positions, ascending                    |
| mlm_labels    | list<id>                              | masked  | original ids at those positions                |
| hidden        | vector float16 × d                    | token   | teacher's last hidden state @ projection (all modes but none) |
| hidden_layers | vector float16 × n·d                  | token   | with --hidden-layers: the teacher's states after n other layers, d each, each @ its projection |
| relation      | vector float16 × n·D                  | token   | with --relation-layer: one teacher layer's attention projections (n of q, k, v, D each), raw |
| topk_ids      | vector id × k                         | target  | topk: the teacher's k largest logits' ids      |
| topk_logits   | vector float16 × k                    | target  | topk: their raw logits (temperature 1)         |
| log_z         | vector float32 × n_T                  | target  | topk: log sum_v exp(z_v / T), full vocabulary, per T of the grid |
| sample_ids    | list<list<id>>                        | target  | sampled: distinct tokens drawn, ascending      |
| sample_counts | list<list<uint16>>                    | target  | sampled: how often each was drawn (sum = N)    |
| teacher_state | vector float16 × H'                   | target  | exact: the teacher decoder's input; logits = state @ W.T + b with head.safetensors |

Target modes: topk (probabilities of the k tokens exact at any T of the grid:
exp(topk_logit / T - log_z[T]); the tail mass is 1 minus their sum), sampled (N draws from the
teacher's softened distribution at the one dump temperature), exact (the full logits are
recomputed), none (masked inputs and labels only: for MLM-only training such as teacher-adapt).

Why version 3: version 2 stored those vectors as `list<fixed_size_list<T, w>>`, and Parquet keeps
repetition and definition levels for every one of their values (128 per token for a 128-wide
hidden state); building and parsing those levels, not zstd, set the pace of both the dump's
encoding (0.3x of its compress+hash floor) and the loader's decoding (bench/RESULTS.md, issue 17).
One binary value per row carries no levels at all. Version-2 caches are refused (re-dump them):
their bytes are not those a version-3 dump would write, so resuming or mixing them is not possible.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 3
SCHEMA_VERSION_KEY = b"kdpipe.schema_version"
FINGERPRINT_KEY = b"kdpipe.fingerprint_sha256"
VECTOR_DTYPE_KEY = b"kdpipe.dtype"  # a vector column's numpy dtype, little-endian ("<f2")
VECTOR_WIDTH_KEY = b"kdpipe.width"  # its values per entry

SHARDS_DIR = "shards"
SHARD_PATTERN = SHARDS_DIR + "/shard-{index:05d}.parquet"  # index: the shard's, zero-padded
SHARD_RE = r"^" + SHARDS_DIR + r"/shard-\d+\.parquet$"  # a shard's path, as a store lists it


def shard_path(index: int) -> str:
    """The shard's path relative to the cache directory."""
    return SHARD_PATTERN.format(index=index)


def id_type(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()


def vector_field(name: str, value_type: pa.DataType, width: int) -> pa.Field:
    """A vector column (see the top): one binary value per row, `width` values of `value_type` per
    entry. Layer-wise or other per-token vectors use this too, so one encoder and one check serve them."""
    dtype = np.dtype(value_type.to_pandas_dtype()).newbyteorder("<")
    return pa.field(name, pa.large_binary(), nullable=False,
                    metadata={VECTOR_DTYPE_KEY: dtype.str.encode(), VECTOR_WIDTH_KEY: str(width).encode()})


def vector_layout(field: pa.Field) -> tuple[np.dtype, int] | None:
    """(dtype, width) of a vector column, from its field metadata; None for any other column."""
    md = field.metadata or {}
    if VECTOR_DTYPE_KEY not in md or not pa.types.is_large_binary(field.type):
        return None
    return np.dtype(md[VECTOR_DTYPE_KEY].decode()), int(md[VECTOR_WIDTH_KEY])


def shard_schema(vocab_size: int, k: int = 0, n_temperatures: int = 0, hidden_dim: int = 0,
                 mode: str = "topk", state_dim: int = 0, hidden_layers: int = 0,
                 relation_width: int = 0) -> pa.Schema:
    """The one explicit schema of a cache's shards, from the settings in its manifest: the fields
    every mode has, then the target mode's own (pipeline/modes declares them). hidden_layers: how
    many other layers' states the cache stores beside the last (pipeline/layer_targets.py);
    relation_width: entries per token of the relation column (pipeline/relation_targets.py), 0: none."""
    from kdpipe.pipeline.modes import get_mode

    target = get_mode(mode)
    ids = id_type(vocab_size)
    fields = [
        pa.field("seq_id", pa.uint64(), nullable=False),
        pa.field("view", pa.uint16(), nullable=False),
        pa.field("length", pa.uint16(), nullable=False),
        pa.field("input_ids", pa.list_(ids), nullable=False),
        pa.field("mlm_positions", pa.list_(pa.uint16()), nullable=False),
        pa.field("mlm_labels", pa.list_(ids), nullable=False),
    ]
    if target.uses_teacher:
        fields.append(vector_field("hidden", pa.float16(), hidden_dim))
        if hidden_layers:  # one per-token column, as wide as the layers' states together
            fields.append(vector_field("hidden_layers", pa.float16(), hidden_layers * hidden_dim))
        if relation_width:
            fields.append(vector_field("relation", pa.float16(), relation_width))
    fields += target.fields(ids, k, n_temperatures, state_dim)
    return pa.schema(fields, metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()})


def manifest_schema(m: Any) -> pa.Schema:
    """The shard schema a finished cache's manifest (schemas.manifest.Manifest) implies."""
    return shard_schema(m.vocab_size, m.top_k, len(m.temperatures), m.hidden_dim, m.targets, m.state_dim or 0,
                        len(m.hidden_layers or []), m.relation.width if m.relation else 0)
