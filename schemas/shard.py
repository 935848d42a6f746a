"""The Arrow schema of a cache shard: one row per (sequence, mask view), one list entry per token.

Version 2. Per-token columns hold `length` entries (padding is never stored); target columns hold
one entry per target position: every token (positions "all") or the masked ones, in the order of
`mlm_positions` (positions "masked", the reference's restrict_ce_to_mask). Ids are uint16 when
the vocabulary fits in 16 bits, else uint32; stored activations are float16; log-partition
values float32 (their error would otherwise shift every probability).

| column        | type                                  | per     | meaning                                        |
|---------------|---------------------------------------|---------|------------------------------------------------|
| seq_id        | uint64                                | row     | position of the sequence in the packed corpus  |
| view          | uint16                                | row     | which independent mask draw                    |
| length        | uint16                                | row     | tokens, [CLS] and [SEP] included               |
| input_ids     | list<id>                              | token   | the input as the teacher saw it (masked)       |
| mlm_positions | list<uint16>                          | masked  | masked positions, ascending                    |
| mlm_labels    | list<id>                              | masked  | original ids at those positions                |
| hidden        | list<fixed_size_list<float16, d>>     | token   | teacher's last hidden state @ projection (all modes but none) |
| hidden_layers | list<fixed_size_list<float16, n*d>>   | token   | with --hidden-layers: the teacher's states after n other layers, d each, each @ its projection |
| topk_ids      | list<fixed_size_list<id, k>>          | target  | topk: the teacher's k largest logits' ids      |
| topk_logits   | list<fixed_size_list<float16, k>>     | target  | topk: their raw logits (temperature 1)         |
| log_z         | list<fixed_size_list<float32, n_T>>   | target  | topk: log sum_v exp(z_v / T), full vocabulary, per T of the grid |
| sample_ids    | list<list<id>>                        | target  | sampled: distinct tokens drawn, ascending      |
| sample_counts | list<list<uint16>>                    | target  | sampled: how often each was drawn (sum = N)    |
| teacher_state | list<fixed_size_list<float16, H'>>    | target  | exact: the teacher decoder's input; logits = state @ W.T + b with head.safetensors |

Target modes: topk (probabilities of the k tokens exact at any T of the grid:
exp(topk_logit / T - log_z[T]); the tail mass is 1 minus their sum), sampled (N draws from the
teacher's softened distribution at the one dump temperature), exact (the full logits are
recomputed), none (masked inputs and labels only: for MLM-only training such as teacher-adapt).
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 2
SCHEMA_VERSION_KEY = b"kdpipe.schema_version"
FINGERPRINT_KEY = b"kdpipe.fingerprint_sha256"

SHARDS_DIR = "shards"
SHARD_PATTERN = SHARDS_DIR + "/shard-{index:05d}.parquet"  # index: the shard's, zero-padded
SHARD_RE = r"^" + SHARDS_DIR + r"/shard-\d+\.parquet$"  # a shard's path, as a store lists it


def shard_path(index: int) -> str:
    """The shard's path relative to the cache directory."""
    return SHARD_PATTERN.format(index=index)


def id_type(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 1 << 16 else pa.uint32()


def shard_schema(vocab_size: int, k: int = 0, n_temperatures: int = 0, hidden_dim: int = 0,
                 mode: str = "topk", state_dim: int = 0, hidden_layers: int = 0) -> pa.Schema:
    """The one explicit schema of a cache's shards, from the settings in its manifest: the fields
    every mode has, then the target mode's own (pipeline/modes declares them). hidden_layers: how
    many other layers' states the cache stores beside the last (pipeline/layer_targets.py)."""
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
        fields.append(pa.field("hidden", pa.list_(pa.list_(pa.float16(), hidden_dim)), nullable=False))
        if hidden_layers:  # one per-token column, as wide as the layers' states together
            fields.append(pa.field("hidden_layers", pa.list_(pa.list_(pa.float16(), hidden_layers * hidden_dim)),
                                   nullable=False))
    fields += target.fields(ids, k, n_temperatures, state_dim)
    return pa.schema(fields, metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()})
