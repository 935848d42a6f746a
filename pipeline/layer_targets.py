"""Layer-wise targets: the teacher's hidden states after chosen layers, cached beside `hidden`.

An extra kind of cached target, orthogonal to the target mode (any mode that stores `hidden`
can also store these: topk, sampled, exact), in the spirit of TinyBERT's hidden-state loss.

Dump (`teacher-dump --hidden-layers 2,4`): per token, the teacher's hidden state after each
chosen layer, in transformers' numbering of `hidden_states` (0: the embeddings' output, l: after
encoder layer l; the last layer N is `hidden` already and is not repeated), each through its own
projection (H, d) of the kind and width of the last layer's: pca is fitted on that layer's own
states (a layer's principal directions are not the last layer's); identity and random are the
same matrix for every layer. They are stored as one per-token column, `hidden_layers`, of n * d
float16 per token, layer layers[i] at entries i*d .. (i+1)*d - 1, and the projections in
projection.safetensors under `layers` (n, H, d), in the same order. More layers never need new
fields: the column, the batch tensor (N, n, d) and the projection stack just grow.

Train (`student-train --alpha-layer-cos W`): L_layer = mean over matched layers of mean over the
N non-padding tokens of 1 - cos(map_i(student state), teacher's stored state), the last layer's
L_cos repeated below it. The map of each layer is its projection where the student is as wide as
the teacher, else a learned linear map (H_s -> d), as for L_cos.

Which layers are matched: student output m (m = 1 .. M-1: after its m-th layer) is matched to the
teacher's output before the layer that student layer m started from, hidden_states[layer_map[m]]:
each student layer's input is asked to be what its source layer's input was. With the default map
(every other layer, floor(m N / M)) this is TinyBERT's uniform mapping g(m) = m N / M: a 3-layer
student of a 6-layer teacher matches its outputs 1, 2 to the teacher's 2, 4 (and 3 to 6: L_cos).
A student not initialised from the teacher uses the default map. The student's embedding output
(m = 0) is not matched.
"""

from __future__ import annotations

import torch
from torch import nn

COLUMN = "hidden_layers"  # the shard column (schemas/shard.py), the ShardData, Batch and TeacherOutputs field


# ------------------------------------------------------------------------------------ dump side

def dump_problems(layers: list[int], teacher_layers: int) -> list[str]:
    """--hidden-layers the teacher cannot serve (the list is sorted and distinct already)."""
    out = []
    if teacher_layers in layers:
        out.append(f"--hidden-layers {teacher_layers} is the teacher's last layer, stored as the hidden "
                   "column already: give layers 0 (embeddings) to "
                   f"{teacher_layers - 1}")
    bad = [x for x in layers if x > teacher_layers]
    if bad:
        out.append(f"--hidden-layers {', '.join(map(str, bad))}: the teacher has {teacher_layers} layers "
                   f"(give 0 to {teacher_layers - 1})")
    return out


def fingerprint(layers: list[int]) -> dict[str, list[int]]:
    """The fingerprint's hidden section gains `layers` only where some are stored (a cache without
    them keeps the fingerprint it always had)."""
    return {"layers": list(layers)} if layers else {}


def description(hidden: dict) -> dict | None:
    """What a reader needs to decode the column (the shards' kdpipe.description, the dataset card)."""
    layers = hidden.get("layers") or []
    if not layers:
        return None
    return {"layers": layers, "dim": hidden.get("dim"), "projection": hidden.get("projection"),
            "meaning": "teacher hidden states after these layers (0: the embeddings' output), one block of "
                       "dim entries per layer in this order, each @ its projection: projection.safetensors "
                       "'layers'[i] (H, dim)"}


MEANING = "teacher hidden states after the layers of kdpipe.layers, dim entries each, in that order, " \
          "each @ its projection (projection.safetensors 'layers')"


# ---------------------------------------------------------------------------------- train side

def matched(layer_map: list[int], student_layers: int) -> list[tuple[int, int]]:
    """(student hidden_states index m, teacher hidden_states index) for m = 1 .. M-1 (see the top)."""
    return [(m, int(layer_map[m])) for m in range(1, student_layers)]


def train_problems(pairs: list[tuple[int, int]], stored: list[int], student_layers: int) -> list[str]:
    """Why --alpha-layer-cos cannot be served by this cache and student, each with what to do."""
    if not pairs:
        return [f"--alpha-layer-cos: a {student_layers}-layer student has no layer below its last to "
                "match (its last layer is L_cos's): set it to 0"]
    want = sorted({t for _, t in pairs})
    missing = [t for t in want if t not in stored]
    if missing:
        held = ", ".join(map(str, stored)) if stored else "none"
        return [f"--alpha-layer-cos needs the teacher's hidden states after layer(s) "
                f"{', '.join(map(str, want))} (matched to the student's layers 1..{student_layers - 1}), "
                f"but the cache holds {held}: dump it with --hidden-layers {','.join(map(str, want))}, "
                "or set --alpha-layer-cos 0"]
    return []


def columns(pairs: list[tuple[int, int]], stored: list[int]) -> tuple[tuple[int, int], ...]:
    """(student hidden_states index, block of the cached column) for each matched pair."""
    return tuple((m, stored.index(t)) for m, t in pairs)


class WithLayerMaps(nn.Module):
    """The last layer's hidden map (called as before: (N, H_s) -> (N, d)) and one map per matched
    layer, `layers[i]` for pair i, so a checkpoint and DDP see them as one module."""

    def __init__(self, last: nn.Module, layers: list[nn.Module]) -> None:
        super().__init__()
        self.last = last
        self.layers = nn.ModuleList(layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, H_s) -> (N, d)
        return self.last(h)


def with_layer_maps(last: nn.Module, student_width: int, teacher_width: int,
                    projections: list[torch.Tensor]) -> WithLayerMaps:
    """`last` and, for each matched layer's (H, d) projection, its map (stu.hidden_map's rule)."""
    from kdpipe.pipeline import student as stu  # the student imports transformers' machinery

    return WithLayerMaps(last, [stu.hidden_map(student_width, teacher_width, p) for p in projections])
