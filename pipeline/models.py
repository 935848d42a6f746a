"""The models `kdpipe eval` compares: find them, load them, and say what they are.

A teacher is a model folder (or builtin:NAME). A student is a student-train run directory
(its final/ model, and metrics.jsonl for the training curves) or a plain model folder; a run's
final/ given directly still finds its run directory. Any of them may be named NAME=PATH.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from kdpipe.pipeline import speed
from kdpipe.pipeline.errors import KdpipeError, first_line
from kdpipe.pipeline.fsutil import read_json, safe_join
from kdpipe.pipeline.teacher import load_masked_lm, load_tokenizer, resolve_model_path, tokenizer_sha256
from kdpipe.schemas.checkpoint import CHECKPOINTS_DIR, FINAL_DIR, METRICS_NAME, RUN_NAME

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


@dataclass
class Model:
    name: str
    role: Literal["teacher", "student"]
    path: Path  # the model folder
    run_dir: Path | None = None
    metrics_file: Path | None = None
    module: torch.nn.Module | None = None  # the masked LM, eval mode
    missing_head: list[str] = field(default_factory=list)
    tokenizer: Any = None
    tokenizer_sha: str = ""
    entry: dict[str, Any] = field(default_factory=dict)  # ModelEntry fields


def split_name(spec: str) -> tuple[str | None, str]:
    """'NAME=VALUE' -> (NAME, VALUE) when NAME is a plain name, else (None, spec)."""
    name, sep, value = spec.partition("=")
    if sep and value and NAME_RE.match(name):
        return name, value
    return None, spec


def _safe_name(raw: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", raw).strip("-.")
    return name or "model"


def resolve_teacher(spec: str) -> Model:
    name, value = split_name(spec)
    path = Path(resolve_model_path(value)).expanduser()
    if not path.exists():
        raise KdpipeError(f"teacher {value} does not exist")
    if not (path / "config.json").is_file():
        raise KdpipeError(f"teacher {value} is not a model folder (no config.json)")
    return Model(name or "teacher", "teacher", path.resolve())


def resolve_student(spec: str) -> Model:
    """A student-train run directory (RUN_DIR/final + metrics.jsonl) or a plain model folder."""
    name, value = split_name(spec)
    p = Path(value).expanduser()
    if not p.exists():
        raise KdpipeError(f"student {value} does not exist")
    if not p.is_dir():
        raise KdpipeError(f"student {value} is not a directory (give a student-train run "
                          "directory or a model folder)")
    if (p / FINAL_DIR / "config.json").is_file():
        run_dir, folder = p, p / FINAL_DIR
    elif (p / "config.json").is_file():
        folder = p
        run_dir = p.parent if p.name == FINAL_DIR and (p.parent / RUN_NAME).is_file() else None
    elif (p / FINAL_DIR).exists() or (p / RUN_NAME).is_file() or (p / CHECKPOINTS_DIR).is_dir() \
            or (p / METRICS_NAME).is_file():
        raise KdpipeError(f"student run {value} has no final model ({p / FINAL_DIR / 'config.json'} "
                          "is missing): its training has not finished; resume it with "
                          "`kdpipe student-train`, or give a checkpoint exported as a model folder")
    else:
        raise KdpipeError(f"student {value} is neither a student-train run directory (with final/) "
                          "nor a model folder (with config.json)")
    metrics_file = run_dir / METRICS_NAME if run_dir and (run_dir / METRICS_NAME).is_file() else None
    name = name or _safe_name((run_dir or folder).resolve().name)
    return Model(name, "student", folder.resolve(), run_dir.resolve() if run_dir else None,
                 metrics_file.resolve() if metrics_file else None)


def resolve_models(teacher: str, students: list[str], baseline: str | None = None) -> list[Model]:
    """Teacher first, then the students; names must differ, and a baseline must be a student."""
    models = [resolve_teacher(teacher), *map(resolve_student, students)]
    names = [m.name for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise KdpipeError(f"two models are named {dupes[0]!r}; name them with --student NAME=PATH")
    if baseline is not None and baseline not in names[1:]:
        raise KdpipeError(f"--baseline {baseline!r} is not a student (students: {', '.join(names[1:])})")
    return models


def weights_files(folder: Path) -> list[Path]:
    """The model's weights as save_pretrained writes them: one file, or the shards an index lists
    (other safetensors files beside them, such as student-train's hidden map, are not the model)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            return [p for p in (safe_join(folder, s) for s in shards) if p.is_file()]
    files = [folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).is_file()]
    if not files:
        raise KdpipeError(f"model folder {folder} holds no weights file (model.safetensors)")
    return files[:1]  # transformers loads the safetensors file when both are there


def load_model(m: Model, teacher_tokenizer: Any = None) -> None:
    """The masked LM, its tokenizer (its own if the folder has one, else the teacher's), its size."""
    files = weights_files(m.path)
    try:
        m.module, m.missing_head = load_masked_lm(str(m.path))
    except (OSError, ValueError, KeyError) as e:
        raise KdpipeError(f"cannot load {m.role} {m.name} from {m.path}: {first_line(e)}") from None
    has_tokenizer = any((m.path / f).is_file() for f in TOKENIZER_FILES)
    if has_tokenizer or teacher_tokenizer is None:
        m.tokenizer = load_tokenizer(str(m.path))
    else:
        m.tokenizer = teacher_tokenizer
    m.tokenizer_sha = tokenizer_sha256(m.tokenizer)
    m.entry = {
        "name": m.name, "role": m.role, "path": str(m.path),
        "run_dir": str(m.run_dir) if m.run_dir else None,
        "metrics_file": str(m.metrics_file) if m.metrics_file else None,
        **speed.size(m.module, files),
    }


def read_curves(m: Model) -> list[dict[str, Any]]:
    """metrics.jsonl rows; a torn last line (a killed run) and malformed lines are skipped."""
    rows = []
    if m.metrics_file is None:
        return rows
    with open(m.metrics_file, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows
