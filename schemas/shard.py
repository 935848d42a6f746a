"""The Arrow schema of a cache shard: one row per (sequence, mask view), one list entry per token.

Version 1. Every per-token column holds exactly `length` entries (padding is never stored).
Ids are uint16 when the vocabulary fits in 16 bits, else uint32; logits and hidden projections
are float16, log-partition values float32 (their errors would otherwise shift every probability).

| column        | type                                   | shape     | meaning                                      |
|---------------|----------------------------------------|-----------|----------------------------------------------|
| seq_id        | uint64                                 |           | position of the sequence in the packed corpus |
| view          | uint16                                 |           | which independent mask draw                  |
| length        | uint16                                 |           | tokens, [CLS] and [SEP] included             |
| input_ids     | list<id>                               | (T,)      | the input as the teacher saw it (masked)      |
| mlm_positions | list<uint16>                           | (M,)      | masked positions, ascending                  |
| mlm_labels    | list<id>                               | (M,)      | original ids at those positions              |
| topk_ids      | list<fixed_size_list<id, k>>           | (T, k)    | teacher's top-k token ids, by falling logit  |
| topk_logits   | list<fixed_size_list<float16, k>>      | (T, k)    | their raw logits (temperature 1)             |
| log_z         | list<fixed_size_list<float32, n_T>>    | (T, n_T)  | log sum_v exp(z_v / T), full vocabulary, per T of the grid |
| hidden        | list<fixed_size_list<float16, d>>      | (T, d)    | teacher's last hidden state @ projection     |

The teacher's softened probability of a top-k token at temperature T is
exp(topk_logit / T - log_z[T]); the mass outside the top-k is 1 minus their sum.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"kdpipe.schema_version"
FINGERPRINT_KEY = b"kdpipe.fingerprint_sha256"


def id_type(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()


def shard_schema(vocab_size: int, k: int, n_temperatures: int, hidden_dim: int) -> pa.Schema:
    ids = id_type(vocab_size)
    return pa.schema(
        [
            pa.field("seq_id", pa.uint64(), nullable=False),
            pa.field("view", pa.uint16(), nullable=False),
            pa.field("length", pa.uint16(), nullable=False),
            pa.field("input_ids", pa.list_(ids), nullable=False),
            pa.field("mlm_positions", pa.list_(pa.uint16()), nullable=False),
            pa.field("mlm_labels", pa.list_(ids), nullable=False),
            pa.field("topk_ids", pa.list_(pa.list_(ids, k)), nullable=False),
            pa.field("topk_logits", pa.list_(pa.list_(pa.float16(), k)), nullable=False),
            pa.field("log_z", pa.list_(pa.list_(pa.float32(), n_temperatures)), nullable=False),
            pa.field("hidden", pa.list_(pa.list_(pa.float16(), hidden_dim)), nullable=False),
        ],
        metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()},
    )


# Float columns compress better split by byte (sign/exponent bytes apart from mantissa bytes).
BYTE_STREAM_SPLIT_COLUMNS = ("topk_logits", "hidden", "log_z")
