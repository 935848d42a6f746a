"""The student: its architecture, its initialisation from teacher layers, and the map of its
hidden states into the cache's projection space.

The architecture starts from the teacher's config stored in the cache (so a student is built
without the teacher), optionally replaced by a config file, then overridden by the layer, width
and head counts asked for; the default is the teacher with half its layers.

The student is the teacher's architecture (BERT, RoBERTa, ...) or, from a BERT teacher, a
DistilBERT (`arch="distilbert"`, or a --student-config whose model_type is distilbert): the
teacher's config in DistilBERT's names (pipeline/distilbert.py).

Initialisation from the teacher (DistilBERT-style) copies student layer j from teacher layer
layer_map[j] (default: every other layer, floor(j * L_teacher / L_student): 0,2,4 of 6), and every
other tensor (embeddings, MLM head) whose name (through the DistilBERT name map for a DistilBERT
student) and shape match; the rest keeps its seeded random init. Layers are only copied whole: a
layer map needs the student's layer shapes to be the teacher's.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdpipe.pipeline import distilbert
from kdpipe.pipeline.errors import KdpipeError
from kdpipe.pipeline.teacher import quiet_transformers
from kdpipe.schemas.checkpoint import FINAL_HIDDEN_MAP_NAME, HIDDEN_MAP_FILE

_LAYER_KEY = re.compile(r"^(.*?\.layer\.)(\d+)\.(.+)$")  # bert.encoder.layer.3.attention...


def default_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spread teacher layers, starting at 0: every other one when the student has half."""
    return [j * teacher_layers // student_layers for j in range(student_layers)]


def check_layer_map(layer_map: list[int], teacher_layers: int, student_layers: int) -> list[str]:
    """Problems with a layer map, one line each (empty when it is usable)."""
    problems = []
    if len(layer_map) != student_layers:
        problems.append(f"layer map has {len(layer_map)} entries but the student has {student_layers} layers")
    bad = [i for i in layer_map if not 0 <= i < teacher_layers]
    if bad:
        problems.append(f"layer map names teacher layer(s) {', '.join(map(str, bad))} but the teacher has "
                        f"{teacher_layers} layers (0..{teacher_layers - 1})")
    return problems


ARCHITECTURES = ("teacher", distilbert.MODEL_TYPE)  # the teacher's own, or DistilBERT


def student_config(teacher_config: dict[str, Any], override: dict[str, Any] | None = None,
                   layers: int | None = None, hidden: int | None = None, heads: int | None = None,
                   intermediate: int | None = None, arch: str = "teacher") -> Any:
    """A transformers config for the student, from the teacher's config dict: the teacher's
    architecture, or DistilBERT (arch, or the override's model_type) in DistilBERT's names."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise KdpipeError(f"unknown student architecture {arch!r} (choose from {', '.join(ARCHITECTURES)})")
    wants = (override or {}).get("model_type")
    if arch == distilbert.MODEL_TYPE and wants not in (None, distilbert.MODEL_TYPE):
        raise KdpipeError(f"the student architecture is distilbert but --student-config says "
                          f"model_type {wants!r}")
    as_distilbert = distilbert.MODEL_TYPE in (arch, wants) and teacher_config.get("model_type") != wants
    base = distilbert.config_from_bert(teacher_config) if as_distilbert else dict(teacher_config)
    base.update(override or {})
    model_type = base.pop("model_type", None)
    if not model_type:
        raise KdpipeError("the student's config has no model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **{k: v for k, v in base.items() if not k.startswith("_")})
    except (ValueError, KeyError) as e:
        raise KdpipeError(f"cannot build a {model_type!r} student config: {e}") from None
    t_hidden, t_inter = int(teacher_config["hidden_size"]), int(teacher_config["intermediate_size"])
    inter_field = "hidden_dim" if cfg.model_type == distilbert.MODEL_TYPE else "intermediate_size"

    def given(name: str) -> bool:  # the override sets it, in the generic or the model's own name
        return bool(override) and (name in override or cfg.attribute_map.get(name) in override)

    if layers is None and not given("num_hidden_layers"):
        layers = max(1, int(teacher_config["num_hidden_layers"]) // 2)
    if layers is not None:
        cfg.num_hidden_layers = layers
    if hidden is not None:
        cfg.hidden_size = hidden
        if intermediate is None and not given(inter_field):
            setattr(cfg, inter_field, max(1, round(hidden * t_inter / t_hidden)))
    if heads is not None:
        cfg.num_attention_heads = heads
    if intermediate is not None:
        setattr(cfg, inter_field, intermediate)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise KdpipeError(f"student hidden size {cfg.hidden_size} is not a multiple of its "
                          f"{cfg.num_attention_heads} attention heads")
    cfg.architectures = None
    return cfg


def build_student(cfg: Any, seed: int) -> nn.Module:
    """A masked LM with seeded random weights (torch's global RNG is seeded here)."""
    from transformers import AutoModelForMaskedLM

    torch.manual_seed(seed)
    try:
        with quiet_transformers():
            model = AutoModelForMaskedLM.from_config(cfg)
    except ValueError as e:
        raise KdpipeError(f"cannot build a masked-LM student of type {cfg.model_type!r}: {e}") from None
    mlm_head(model)  # refuse unsupported architectures before any training
    return model


def mlm_head(model: nn.Module) -> nn.Module:
    """The head mapping (..., H) last hidden states to (..., V) logits."""
    for name in ("cls", "lm_head"):  # BERT, RoBERTa
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    if distilbert.is_distilbert(model) and hasattr(model, "vocab_projector"):
        return distilbert.Head(model)
    raise KdpipeError(f"student {type(model).__name__} has no BERT/RoBERTa/DistilBERT-style MLM head; "
                      "kdpipe trains BERT-style and DistilBERT students")


def save_pretrained(model: nn.Module, folder: Path, tokenizer: Any | None = None) -> None:
    """The student as a plain transformers folder (config.json, model.safetensors) and its
    tokenizer where one is known, without transformers' progress bar."""
    with quiet_transformers():
        model.save_pretrained(str(folder))
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder, model)


def save_tokenizer(tokenizer: Any, folder: Path, model: nn.Module) -> None:
    """The tokenizer beside a saved student; a DistilBERT's returns no token_type_ids (the
    model takes none), recorded in its tokenizer_config.json as model_input_names."""
    if distilbert.is_distilbert(model):
        tokenizer = copy.copy(tokenizer)
        tokenizer.init_kwargs = {**tokenizer.init_kwargs, "model_input_names": list(distilbert.TOKENIZER_INPUTS)}
        tokenizer.model_input_names = list(distilbert.TOKENIZER_INPUTS)
    tokenizer.save_pretrained(str(folder))


def body(model: nn.Module) -> nn.Module:
    """The encoder without the MLM head: (B, T) ids -> outputs whose [0] is (B, T, H)."""
    return model.base_model


@dataclass
class InitReport:
    """What a teacher initialisation copied, for the run record."""

    layer_map: list[int]
    copied: list[str] = field(default_factory=list)  # student parameter names
    kept_random: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"layer_map": self.layer_map, "copied": len(self.copied), "kept_random": self.kept_random}


def init_from_teacher(student: nn.Module, teacher_state: dict[str, torch.Tensor], layer_map: list[int]
                      ) -> InitReport:
    """Copy teacher layer layer_map[j] into student layer j, and every non-layer tensor whose name
    and shape match. Refuses a layer whose shapes differ (a partial layer copy means nothing)."""
    report = InitReport(list(layer_map))
    sd = student.state_dict()
    new: dict[str, torch.Tensor] = {}
    renamed = distilbert.is_distilbert(student)
    for name, t in sd.items():
        m = _LAYER_KEY.match(name)
        if renamed:  # DistilBERT from BERT: through the name map
            src = distilbert.teacher_name(name, layer_map[int(m.group(2))] if m else None,
                                          m.group(3) if m else "") or name
            src_t = distilbert.teacher_tensor(name, src, teacher_state)
        else:
            src = f"{m.group(1)}{layer_map[int(m.group(2))]}.{m.group(3)}" if m else name
            src_t = teacher_state.get(src)
        if src_t is not None and src_t.shape == t.shape:
            new[name] = src_t.detach().to(t.dtype).clone()
            report.copied.append(name)
        elif m:
            got = "missing" if src_t is None else f"shape {tuple(src_t.shape)}"
            raise KdpipeError(f"cannot initialise student {name} {tuple(t.shape)} from teacher {src} "
                              f"({got}); the student's layers must have the teacher's shapes, "
                              "or use --init random")
        else:
            report.kept_random.append(name)
    student.load_state_dict({**sd, **new})
    return report


# the hidden map saved beside a student: in a run's final/, in a checkpoint
HIDDEN_MAP_FILES = (FINAL_HIDDEN_MAP_NAME, HIDDEN_MAP_FILE)


def _weights_file(folder: Path) -> Path:
    f = folder / "model.safetensors"
    if not f.is_file():
        raise KdpipeError(f"--init-from {folder} holds no model.safetensors (give a save_pretrained "
                          "folder: a run's final/, one of its checkpoints/step-N/, or a model folder)")
    return f


def pretrained_config(folder: Path) -> tuple[Any, str]:
    """The config of a save_pretrained folder a student starts from, and its weights' SHA-256."""
    from transformers import AutoConfig

    from kdpipe.pipeline.fsutil import sha256_file

    if not (folder / "config.json").is_file():
        raise KdpipeError(f"--init-from {folder} is not a model folder (no config.json)")
    weights = _weights_file(folder)
    try:
        cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise KdpipeError(f"--init-from {folder}: cannot read its config.json: {e}") from None
    cfg.architectures = None
    return cfg, sha256_file(weights)


def init_from_folder(student: nn.Module, hmap: nn.Module, folder: Path) -> dict[str, Any]:
    """Every student tensor from the folder's model.safetensors (all must be there, tied ones
    aside), and a learned hidden map saved beside it where its shape fits (else it stays random;
    a fixed one is this cache's projection and stays that)."""
    from safetensors.torch import load_file, load_model

    missing, unexpected = load_model(student, str(_weights_file(folder)), strict=False)
    if missing:
        raise KdpipeError(f"--init-from {folder} does not fit its own config: {len(missing)} tensors "
                          f"missing ({sorted(missing)[0]}, ...)")
    report: dict[str, Any] = {"init_from": str(folder), "ignored": sorted(unexpected), "hidden_map": "random"}
    want = {k: tuple(v.shape) for k, v in hmap.state_dict().items()}
    if isinstance(hmap, FixedProjection):
        report["hidden_map"] = "the cache's projection"
        return report
    for name in HIDDEN_MAP_FILES:
        if (folder / name).is_file():
            saved = load_file(str(folder / name))
            if {k: tuple(v.shape) for k, v in saved.items()} == want and want:
                hmap.load_state_dict(saved)
                report["hidden_map"] = name
            break
    return report


class FixedProjection(nn.Module):
    """The cache's own (H, d) projection, for a student as wide as the teacher. Not trained."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix.float().clone(), persistent=True)  # (H, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, H) -> (N, d)
        return h @ self.matrix.to(h.dtype)


def hidden_map(student_width: int, teacher_width: int, projection: torch.Tensor) -> nn.Module:
    """Student hidden states -> cache projection space: the cache's matrix where the widths match,
    else a learned linear map (H_student -> d), trained with the student and saved beside it."""
    if student_width == teacher_width:
        return FixedProjection(projection)
    return nn.Linear(student_width, projection.shape[1], bias=False)


def check_vocab(student_vocab: int, cache_vocab: int) -> None:
    if student_vocab != cache_vocab:
        raise KdpipeError(f"the student's vocabulary has {student_vocab} tokens but the cache's has "
                          f"{cache_vocab}: its logits could not be compared with the teacher's")
