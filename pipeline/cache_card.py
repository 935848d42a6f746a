"""What a cache says about itself, for readers without kdpipe: the shards' Parquet metadata and
the dataset card (README.md) beside the manifest.

Each shard's schema carries key-value metadata (`kdpipe.description`, JSON: the target mode and
positions, the temperature grid in log_z's column order, that logits are raw, the projection,
the vocabulary) and field metadata on the columns whose meaning depends on the dump's settings.
The dataset card's `configs:` section names the shards, so `datasets.load_dataset(CACHE_DIR)`
loads a cache as it is (without it, `datasets` would try to read the cache's JSON files as data).
Both follow from the fingerprint alone: the same settings give the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from kdpipe.pipeline import layer_targets, relation_targets
from kdpipe.pipeline.modes import MODES
from kdpipe.schemas.shard import manifest_schema, vector_layout

CARD_NAME = "README.md"
DESCRIPTION_KEY = b"kdpipe.description"
MEANING_KEY = b"kdpipe.meaning"


def _temps(fingerprint: dict[str, Any]) -> list[float]:
    return [float(t) for t in (fingerprint.get("targets") or {}).get("temperatures") or []]


def description(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The settings a reader needs to decode a shard's columns."""
    t, h = (fingerprint.get("targets") or {}), (fingerprint.get("hidden") or {})
    out: dict[str, Any] = {
        "targets": t.get("mode"), "target_positions": t.get("positions"),
        "target_positions_meaning": "every token of the row, in order" if t.get("positions") == "all"
        else "the masked positions, in the order of mlm_positions",
        "vocab_size": (fingerprint.get("teacher") or {}).get("vocab_size"),
        "teacher_weights_sha256": (fingerprint.get("teacher") or {}).get("weights_sha256"),
    }
    if (mode := MODES.get(t.get("mode"))) is not None:  # the mode's own settings
        out.update(mode.describe(t, _temps(fingerprint)))
    if h:
        out["hidden"] = {"projection": h.get("projection"), "dim": h.get("dim"),
                         "meaning": "teacher last hidden state @ projection.safetensors (H, dim)"}
        if (layers := layer_targets.description(h)) is not None:
            out[layer_targets.COLUMN] = layers
    if (rel := relation_targets.description(fingerprint.get("relation"))) is not None:
        out[relation_targets.COLUMN] = rel
    out["vector_columns"] = ("one binary value per row, C order, little-endian: "
                             "np.frombuffer(value, field's kdpipe.dtype).reshape(-1, field's kdpipe.width)")
    return out


_FIELD_MEANINGS = {
    "input_ids": "the input as the teacher saw it, after masking",
    "mlm_positions": "masked positions in the row, ascending",
    "mlm_labels": "original token ids at mlm_positions",
    **{c: m for mode in MODES.values() for c, m in mode.column_meanings.items()},
}
_TARGET_COLUMNS = {c for mode in MODES.values() for c in mode.columns}  # one entry per target position


def describe(schema: pa.Schema, fingerprint: dict[str, Any]) -> pa.Schema:
    """The shard schema with its description (key-value metadata) and each column's meaning
    (field metadata; log_z's names its temperatures, hidden its projection)."""
    desc = description(fingerprint)
    fields = []
    for f in schema:
        meaning = _FIELD_MEANINGS.get(f.name)
        extra: dict[bytes, bytes] = {}
        if f.name == "log_z":
            meaning = "log sum_v exp(z_v / T) over the full vocabulary, one column per temperature"
            extra[b"kdpipe.temperatures"] = json.dumps(desc.get("temperatures")).encode()
        elif f.name == "hidden" and "hidden" in desc:
            meaning = "teacher last hidden state @ projection.safetensors"
            extra[b"kdpipe.projection"] = str(desc["hidden"]["projection"]).encode()
        elif f.name == layer_targets.COLUMN and f.name in desc:
            meaning = layer_targets.MEANING
            extra[b"kdpipe.layers"] = json.dumps(desc[f.name]["layers"]).encode()
            extra[b"kdpipe.projection"] = str(desc[f.name]["projection"]).encode()
        elif f.name == relation_targets.COLUMN and f.name in desc:
            meaning = relation_targets.MEANING
            extra[b"kdpipe.layer"] = str(desc[f.name]["layer"]).encode()
            extra[b"kdpipe.parts"] = str(desc[f.name]["parts"]).encode()
        if f.name in _TARGET_COLUMNS:
            extra[b"kdpipe.positions"] = str(desc["target_positions"]).encode()
        if meaning:
            f = f.with_metadata({**(f.metadata or {}), MEANING_KEY: meaning.encode(), **extra})
        fields.append(f)
    metadata = {**(schema.metadata or {}), DESCRIPTION_KEY: json.dumps(desc, sort_keys=True).encode()}
    return pa.schema(fields, metadata=metadata)


def render(manifest: Any) -> str:
    """The dataset card of a finished cache (a Manifest): configs, then what the columns hold."""
    fp = manifest.fingerprint
    desc = description(fp)
    temps = ", ".join(f"{x:g}" for x in desc.get("temperatures", [])) or "–"
    layers = (fp.get("hidden") or {}).get("layers") or []
    lines = [
        "---", "configs:", "- config_name: default", "  data_files:", "  - split: train",
        "    path: shards/*.parquet", "tags:", "- kdpipe", "- knowledge-distillation", "- teacher-logits", "---", "",
        "# kdpipe teacher cache", "",
        "Teacher outputs for offline knowledge distillation of a masked LM, written by `kdpipe teacher-dump`: "
        "one row per (sequence, mask view). `datasets.load_dataset(\"path/to/this/folder\")` or "
        "`pyarrow.parquet.read_table(\"shards\")` reads it; `manifest.json` lists every shard with its "
        "SHA-256, and `fingerprint.json` what the cache depends on.", "",
        "| setting | value |", "| :--- | :--- |",
        f"| fingerprint SHA-256 | `{manifest.fingerprint_sha256}` |",
        f"| teacher | {(fp.get('teacher') or {}).get('model_type')}, weights SHA-256 "
        f"`{(fp.get('teacher') or {}).get('weights_sha256')}` |",
        f"| vocabulary | {manifest.vocab_size} |",
        f"| sequences | {manifest.sequences} of up to {manifest.seq_len} tokens, {manifest.rows} rows, "
        f"{manifest.tokens} tokens |",
        f"| targets | {manifest.targets}, at {desc['target_positions_meaning']} |",
        f"| top-k | {manifest.top_k} |", f"| temperatures (log_z columns, in order) | {temps} |",
        f"| hidden states | {(fp.get('hidden') or {}).get('projection')} projection to {manifest.hidden_dim} dims |",
        *([f"| hidden states of other layers (hidden_layers, in order) | {', '.join(map(str, layers))}"
           " (0: embeddings), each through its own projection |"] if layers else []),
        *([f"| attention projections (relation) | teacher layer {manifest.relation.layer}: "
           f"{', '.join(manifest.relation.parts)}, {manifest.relation.dim} entries each, raw |"] if manifest.relation else []),
        f"| bytes per token | {manifest.bytes_per_token} |", "",
        "## Columns", "",
        "Per-token columns hold one entry per token (no padding); target columns one per target position.", "",
        "| column | meaning |", "| :--- | :--- |",
        "| seq_id | position of the sequence in the packed corpus |", "| view | which mask draw |",
        "| length | tokens, [CLS] and [SEP] included |",
        *[f"| {k} | {v} |" for k, v in _FIELD_MEANINGS.items()],
        "| hidden | teacher last hidden state @ projection.safetensors |",
        *([f"| {layer_targets.COLUMN} | {layer_targets.MEANING}: {manifest.hidden_dim} entries per layer above, "
           "in their order |"] if layers else []),
        *([f"| {relation_targets.COLUMN} | {relation_targets.MEANING}: {manifest.relation.dim} entries per part "
           "above, in their order |"] if manifest.relation else []),
        "| log_z | log sum_v exp(z_v / T) over the full vocabulary, one column per temperature above |", "",
        "Logits are stored raw. At temperature T the teacher's probability of top-k token i is "
        "exp(topk_logits_i / T - log_z[T]), exact; the mass outside the top-k is one minus their sum. "
        "Each shard's Parquet metadata (`kdpipe.description`) and field metadata say the same.", "",
        *_vector_section(manifest_schema(manifest)),
    ]
    return "\n".join(lines)


def _vector_section(schema: pa.Schema) -> list[str]:
    """How to decode the vector columns with numpy alone (schemas/shard.py describes the layout)."""
    vectors = [(f.name, *layout) for f in schema if (layout := vector_layout(f)) is not None]
    if not vectors:
        return []
    name, dtype, width = vectors[0]
    return [
        "## Vector columns", "",
        "These columns hold one binary value per row: the row's array of one fixed-width vector per token "
        "(or target position), C order, little-endian. The field metadata names its dtype (`kdpipe.dtype`) "
        "and width (`kdpipe.width`).", "",
        "| column | dtype | width |", "| :--- | :--- | ---: |",
        *[f"| {n} | {d.name} (`{d.str}`) | {w} |" for n, d, w in vectors], "",
        "```python", "import numpy as np, datasets",
        'ds = datasets.load_dataset("path/to/this/folder", split="train")',
        f'{name} = np.frombuffer(ds[0]["{name}"], "{dtype.str}").reshape(-1, {width})  # (entries, {width})',
        "```", "",
    ]
