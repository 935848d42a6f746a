"""Relation targets: what a MiniLM-style self-attention relation loss needs, cached for one layer.

An extra kind of cached target, orthogonal to the target mode (any mode that runs the teacher:
topk, sampled, exact), after MiniLM (Wang et al. 2020: the last layer's attention and value
relation) and MiniLMv2 (2021: Q-Q, K-K and V-V relations with a number of relation heads chosen
independently of the attention heads, so teacher and student may differ in width).

Dump (`teacher-dump --relation-layer L --relation-parts qkv`): per token, the outputs of the
query, key and value projections (the chosen ones, in q, k, v order) of teacher layer L, in the
numbering of --hidden-layers (layer L is the one whose output is hidden_states[L]; the module
encoder.layer.{L-1}, layer-map entry L-1; the last layer, N, is MiniLM's choice). They are stored
raw (no projection: a relation is a dot product within a relation head, which a projection to
fewer dimensions would not keep) as one per-token float16 column, `relation`, part after part,
`dim` entries each (the projection's width, H for BERT). Bytes per token before compression:
2 * dim per part: qkv 6 * H (2,304 B at H = 384), v alone 2 * H (768 B).

The parts are computed by calling the layer's own projection modules on the layer's input,
hidden_states[L - 1], which the forward pass returns anyway: the same modules on the same input
as inside the attention (tests/test_relation_targets.py checks it against forward hooks), without
changing the model, and indifferent to torch.compile and DDP, where state captured by hooks is
awkward.

Train (`student-train --alpha-relation W --relation-heads R`): for each stored part X (teacher) and
the same part of the student's matched layer, split into R relation heads of dim / R,

    A_r = softmax(X_r X_r^T / sqrt(dim / R))  over the keys of the row's real tokens,

and L_rel = mean over parts, relation heads and the rows' real tokens (queries) of KL(A_teacher ||
A_student), in float32 (losses.relation_kl_loss). Matched layer: the student layer copied from
teacher layer L (its layer map holds L - 1; a student not initialised from the teacher uses the
default map), else, where L is the teacher's last, the student's last layer (MiniLM: last to
last); any other layer is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdpipe.pipeline.errors import KdpipeError

COLUMN = "relation"  # the shard column (schemas/shard.py), the ShardData, Batch and TeacherOutputs field
PARTS = "qkv"
PART_CHOICES = ("qkv", "qk", "qv", "kv", "q", "k", "v")  # each in q, k, v order
DEFAULT_PARTS = "qkv"  # MiniLMv2's three relations
_PROJECTION_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))  # BERT/RoBERTa, DistilBERT


# ------------------------------------------------------------------------------ both sides

def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a BERT-, RoBERTa- or DistilBERT-style model (or its base model)."""
    base = getattr(model, "base_model", model)
    for path in (("encoder", "layer"), ("transformer", "layer")):
        obj: Any = base
        for name in path:
            obj = getattr(obj, name, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise KdpipeError(f"{type(model).__name__} has no encoder.layer or transformer.layer list: relation "
                      "targets support BERT-, RoBERTa- and DistilBERT-style models")


class LayerParts:
    """The chosen attention projections of one block, applied to that block's input: (..., H) ->
    (..., n * dim), part after part. A plain object holding the model's own modules (no
    parameters of its own, so nothing new in a state dict or the optimizer)."""

    def __init__(self, model: nn.Module, index: int, parts: str) -> None:
        """index: the block's place in encoder_layers (0-based: teacher layer L is L - 1)."""
        block = encoder_layers(model)[index]
        leaves = {name.rsplit(".", 1)[-1]: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
        names = next((n for n in _PROJECTION_NAMES if all(x in leaves for x in n)), None)
        if names is None:
            raise KdpipeError(f"layer {index + 1} of {type(model).__name__} has no query/key/value projections")
        self.linears = [leaves[names[PARTS.index(p)]] for p in parts]
        self.dim = int(self.linears[0].out_features)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., n * dim)
        return torch.cat([f(x) for f in self.linears], dim=-1)


# ------------------------------------------------------------------------------------ dump side

def dump_problems(layer: int | None, parts: str | None, teacher_layers: int) -> list[str]:
    """--relation-layer/--relation-parts the teacher cannot serve."""
    if layer is None:
        return [f"--relation-parts {parts} needs --relation-layer (the teacher layer whose projections "
                "to store)"] if parts else []
    if not 1 <= layer <= teacher_layers:
        return [f"--relation-layer {layer}: the teacher has {teacher_layers} layers (give 1 to {teacher_layers}; "
                f"{teacher_layers}, the last, is MiniLM's choice)"]
    return []


def fingerprint(layer: int | None, parts: str | None) -> dict[str, Any]:
    """The fingerprint gains a `relation` section only where relations are stored (every other
    cache keeps the fingerprint, and so the bytes, it always had)."""
    return {"relation": {"layer": layer, "parts": parts or DEFAULT_PARTS}} if layer is not None else {}


def entry(layer: int | None, parts: str | None, dim: int, heads: int) -> dict[str, Any] | None:
    """The manifest's `relation` (schemas.manifest.RelationEntry), None without relations."""
    if layer is None:
        return None
    parts = parts or DEFAULT_PARTS
    return {"layer": layer, "parts": parts, "dim": dim, "heads": heads, "raw_bytes_per_token": 2 * dim * len(parts),
            "raw_bytes_per_token_by_parts": {p: 2 * dim * len(p) for p in PART_CHOICES}}


def description(relation: dict | None) -> dict | None:
    """What a reader needs to decode the column (the shards' kdpipe.description, the dataset card)."""
    if not relation:
        return None
    return {"layer": relation["layer"], "parts": relation["parts"],
            "meaning": f"per token, the outputs of teacher layer {relation['layer']}'s attention projections "
                       f"{', '.join(relation['parts'])} (query, key, value), raw, one block of the projection's "
                       "width per part in this order"}


MEANING = "outputs of one teacher layer's attention projections (kdpipe.layer), raw, one block per part " \
          "of kdpipe.parts in that order"


# ---------------------------------------------------------------------------------- train side

def student_layer(layer: int, teacher_layers: int, layer_map: list[int], student_layers: int) -> int | None:
    """The student block (0-based) matched to teacher layer `layer` (see the top), or None."""
    hits = [j for j, t in enumerate(layer_map) if t == layer - 1]
    if hits:
        return hits[-1]
    return student_layers - 1 if layer == teacher_layers else None


def train_problems(relation: Any, heads: int, student_dim: int, matched: int | None, layer_map: list[int]
                   ) -> list[str]:
    """Why --alpha-relation cannot be served by this cache and student, each with what to do."""
    if relation is None:
        return ["--alpha-relation needs the teacher's attention projections in the cache, which holds none: "
                "dump it with --relation-layer L (the teacher's last layer for MiniLM's loss), or set "
                "--alpha-relation 0"]
    out = []
    if matched is None:
        out.append(f"--alpha-relation: the cache's relations are of teacher layer {relation.layer}, which no "
                   f"student layer was copied from (layer map {','.join(map(str, layer_map))}) and which is not "
                   f"the teacher's last: give a --layer-map holding {relation.layer - 1}, or dump with "
                   "--relation-layer set to the teacher's last layer")
    for who, dim in (("the teacher's", relation.dim), ("the student's", student_dim)):
        if dim % heads:
            out.append(f"--relation-heads {heads}: {who} projection width {dim} is not divisible by it")
    return out
