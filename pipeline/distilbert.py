"""A DistilBERT student (`DistilBertForMaskedLM`) built from a BERT teacher.

DistilBERT is BERT without token-type embeddings and pooler, with its layers' tensors renamed.
Its config is the teacher's in DistilBERT's field names; its weights come from the teacher by a
name map (the DistilBERT reference's scripts/extract_distilbert.py does the same for layers
0, 2, 4, 7, 9, 11 of BERT-base; here any layer map). One deliberate difference: the reference
drops BERT's token-type embeddings, which BERT adds (row 0, every cached sequence is one
segment) before its embedding LayerNorm. kdpipe adds that row to the position embeddings
instead, so a DistilBERT built from all of a teacher's layers computes the teacher's own
logits (tested), and a student starts from the teacher's embedding output, not a shifted one.

DistilBERT's LayerNorms have eps 1e-12 fixed (BERT's default; a teacher with another
layer_norm_eps computes slightly differently after the copy).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdpipe.pipeline.errors import KdpipeError

MODEL_TYPE = "distilbert"

# DistilBERT config field <- BERT config field
_CONFIG_FIELDS = {
    "vocab_size": "vocab_size", "max_position_embeddings": "max_position_embeddings",
    "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads", "dim": "hidden_size",
    "hidden_dim": "intermediate_size", "dropout": "hidden_dropout_prob",
    "attention_dropout": "attention_probs_dropout_prob", "activation": "hidden_act",
    "initializer_range": "initializer_range", "pad_token_id": "pad_token_id",
}

# a student layer tensor (after distilbert.transformer.layer.N.) <- the teacher's (after bert.encoder.layer.N.)
LAYER_NAMES = {
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}

# the other student tensors <- the teacher's (position embeddings also take token type 0, above)
OTHER_NAMES = {
    "distilbert.embeddings.word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
    "distilbert.embeddings.position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
    "distilbert.embeddings.LayerNorm.weight": "bert.embeddings.LayerNorm.weight",
    "distilbert.embeddings.LayerNorm.bias": "bert.embeddings.LayerNorm.bias",
    "vocab_transform.weight": "cls.predictions.transform.dense.weight",
    "vocab_transform.bias": "cls.predictions.transform.dense.bias",
    "vocab_layer_norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "vocab_layer_norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "vocab_projector.weight": "cls.predictions.decoder.weight",
    "vocab_projector.bias": "cls.predictions.bias",
}
_TOKEN_TYPE = "bert.embeddings.token_type_embeddings.weight"
_POSITION = "distilbert.embeddings.position_embeddings.weight"


def config_from_bert(teacher_config: dict[str, Any]) -> dict[str, Any]:
    """The teacher's BERT config dict in DistilBERT's field names (model_type included)."""
    if teacher_config.get("model_type") != "bert":
        raise KdpipeError(f"a DistilBERT student is built from a BERT teacher; this cache's teacher is "
                          f"{teacher_config.get('model_type')!r} (use the teacher's own architecture)")
    out = {"model_type": MODEL_TYPE}
    out.update({d: teacher_config[b] for d, b in _CONFIG_FIELDS.items() if b in teacher_config})
    return out


def is_distilbert(model_or_config: Any) -> bool:
    cfg = getattr(model_or_config, "config", model_or_config)
    return getattr(cfg, "model_type", None) == MODEL_TYPE


def teacher_name(student_name: str, layer: int | None, rest: str) -> str | None:
    """The teacher tensor a student tensor is copied from (None: nothing maps to it). For a
    layer tensor, `layer` is the teacher layer and `rest` the name after the layer index
    ("attention.q_lin.weight"); for the others layer is None."""
    if layer is None:
        return OTHER_NAMES.get(student_name)
    module, _, leaf = rest.rpartition(".")  # "attention.q_lin", "weight"
    src = LAYER_NAMES.get(module)
    return None if src is None else f"bert.encoder.layer.{layer}.{src}.{leaf}"


def teacher_tensor(student_name: str, src: str, teacher_state: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The value to copy: the teacher's tensor, with token type 0 folded into the positions."""
    t = teacher_state.get(src)
    if t is None and src == "cls.predictions.bias":  # older checkpoints keep it on the decoder
        t = teacher_state.get("cls.predictions.decoder.bias")
    if t is not None and student_name == _POSITION and _TOKEN_TYPE in teacher_state:
        t = t + teacher_state[_TOKEN_TYPE][0]  # (P, H) + (H,)
    return t


class Head(nn.Module):
    """DistilBertForMaskedLM's head as one module, (..., H) -> (..., V): transform, activation,
    LayerNorm, projector (the model keeps them as four attributes, not a `cls` module)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.vocab_transform, self.vocab_layer_norm = model.vocab_transform, model.vocab_layer_norm
        self.vocab_projector, self.activation = model.vocab_projector, model.activation

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., V)
        return self.vocab_projector(self.vocab_layer_norm(self.activation(self.vocab_transform(h))))


# DistilBERT takes no token_type_ids: a tokenizer saved beside the student must not return them,
# or pipeline("fill-mask") and a plain `model(**tok(text))` fail on the unexpected argument.
TOKENIZER_INPUTS = ["input_ids", "attention_mask"]
