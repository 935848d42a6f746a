"""`kdpipe eval`: how much of the teacher did each student keep, at what size and speed?

    kdpipe eval --teacher ./teacher --student runs/full --student no-ce=runs/ablate-ce \
        --heldout heldout.txt --task builtin:movie-sentiment --task builtin:trec \
        --out reports/wiki --seeds 3 --max-train-examples 2000

One command, one report directory: `report.md` (tables a person reads at a glance), `report.json`
(schema kdpipe-eval-report v1), PNG plots, and `parts/`, the finished units of work.

Set up: resolve and check every input before any compute (model folders, tokenizers, held-out
text, task files with their columns and classes), then compare the settings with
REPORT_DIR/eval.json: a directory made with other settings is refused, naming what differs.
Run: speed (all models interleaved), masked LM on held-out text (one pass, the teacher's logits
shared by every student), then the fine-tunes seed by seed, task by task, model by model. Each
finished unit is written atomically under parts/ and never redone: an interrupted eval, `kill -9`
included, resumes where it stopped. `--seeds` may be raised on a rerun; the seeds already done
are reused. Finish: assemble report.json, report.md and the plots, each written atomically.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import click
import numpy as np
import torch
from pydantic import Field, ValidationError, field_validator, model_validator

from kdpipe.pipeline import corpus as corpus_mod
from kdpipe.pipeline import downstream, metrics
from kdpipe.pipeline import report as render
from kdpipe.pipeline.cli import build_config, config_option, echo_json
from kdpipe.pipeline.config import StageConfig
from kdpipe.pipeline.device import autocast, pick_device
from kdpipe.pipeline.errors import KdpipeError
from kdpipe.pipeline.fsutil import (
    atomic_write_bytes, atomic_write_json, dumps_json, ensure_dir, exclusive_lock, read_json,
    remove_stale_tmp, safe_join, sha256_bytes, sha256_file,
)
from kdpipe.pipeline.masking import MaskingSpec, Vocabulary, mask_sequence
from kdpipe.pipeline.provenance import provenance
from kdpipe.pipeline.teacher import (
    decoder_bypassed, decoder_of, load_tokenizer, resolve_model_path, tokenizer_sha256,
)
from kdpipe.schemas.report import (
    MARKDOWN_NAME, PARTS_DIR, REPORT_NAME, SETTINGS_NAME, SPLITS_DIR, AblationRow, EvalSettings,
    MlmResult, MlmSection, ModelEntry, Part, Report, SeedScore, SpeedResult, SpeedSection, Spread,
    TaskModelResult, TaskSection, TaskSplit,
)

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
SPEED_WHAT = "encoder forward (model.base_model: no MLM or task head), random tokens, inference mode"


class EvalConfig(StageConfig):
    teacher: str
    students: list[str] = Field(min_length=1)
    out: str
    heldout: list[str] = []
    tasks: list[str] = []
    baseline: str | None = None  # the student the ablation table compares against [first]
    # masked LM on held-out text
    heldout_text_column: str = "text"
    heldout_sequences: int = Field(256, ge=1)
    seq_len: int = Field(128, ge=8, le=65535)
    packing: Literal["pack", "line"] = "pack"
    mask_prob: float = Field(0.15, gt=0, lt=1)
    mask_token_prob: float = Field(0.8, ge=0, le=1)
    random_token_prob: float = Field(0.1, ge=0, le=1)
    mask_seed: int = Field(0, ge=0)
    # downstream
    text_column: str = "text"
    label_column: str = "label"
    task_split: str = "train"
    seeds: int = Field(3, ge=1, le=100)
    split_seed: int = Field(0, ge=0)
    dev_fraction: float = Field(0.1, gt=0, lt=1)
    max_train_examples: int | None = Field(None, ge=1)
    max_dev_examples: int | None = Field(None, ge=1)
    lr: float = Field(5e-5, gt=0)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(128, ge=4)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    eval_batch_size: int = Field(64, ge=1)
    # size and speed
    speed: bool = True
    speed_batch_size: int = Field(32, ge=1)
    speed_seq_len: int = Field(128, ge=4)
    speed_repeats: int = Field(10, ge=1)
    speed_warmup: int = Field(2, ge=0)
    device: str = "auto"

    @field_validator("students", "tasks", "heldout")
    @classmethod
    def _no_blank(cls, v: list[str]) -> list[str]:
        if any(not s.strip() for s in v):
            raise ValueError("must not be empty")
        return v

    @model_validator(mode="after")
    def _probs(self) -> "EvalConfig":
        if self.mask_token_prob + self.random_token_prob > 1:
            raise ValueError("mask_token_prob + random_token_prob must not exceed 1")
        return self

    def masking(self) -> MaskingSpec:
        return MaskingSpec(self.mask_prob, self.mask_token_prob, self.random_token_prob, 0.0,
                           self.mask_seed)

    def recipe(self) -> downstream.Recipe:
        return downstream.Recipe(self.lr, self.epochs, self.batch_size, self.max_length,
                                 self.weight_decay, self.warmup_ratio, self.eval_batch_size)


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


@dataclass
class Setup:
    cfg: EvalConfig
    out: Path
    device: torch.device
    models: list[Model]  # teacher first
    heldout: corpus_mod.Corpus | None
    tasks: list[downstream.Task]
    splits: dict[str, downstream.Split]
    settings: dict[str, Any]  # eval.json content
    settings_sha: str
    warnings: list[str]

    @property
    def teacher(self) -> Model:
        return self.models[0]

    @property
    def students(self) -> list[Model]:
        return self.models[1:]


# ---------------------------------------------------------------------------------------- set up

def split_name(spec: str) -> tuple[str | None, str]:
    """'NAME=VALUE' -> (NAME, VALUE) when NAME is a plain name, else (None, spec)."""
    name, sep, value = spec.partition("=")
    if sep and value and NAME_RE.match(name):
        return name, value
    return None, spec


def _safe_name(raw: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", raw).strip("-.")
    return name or "model"


def resolve_student(spec: str) -> Model:
    """A student-train run directory (RUN_DIR/final + metrics.jsonl) or a plain model folder."""
    name, value = split_name(spec)
    p = Path(value).expanduser()
    if not p.exists():
        raise KdpipeError(f"student {value} does not exist")
    if not p.is_dir():
        raise KdpipeError(f"student {value} is not a directory (give a student-train run "
                          "directory or a model folder)")
    if (p / "final" / "config.json").is_file():
        run_dir, folder = p, p / "final"
    elif (p / "config.json").is_file():
        folder = p
        run_dir = p.parent if p.name == "final" and (p.parent / "run.json").is_file() else None
    elif (p / "final").exists() or (p / "run.json").is_file() or (p / "checkpoints").is_dir() \
            or (p / "metrics.jsonl").is_file():
        raise KdpipeError(f"student run {value} has no final model ({p / 'final' / 'config.json'} "
                          "is missing): its training has not finished; resume it with "
                          "`kdpipe student-train`, or give a checkpoint exported as a model folder")
    else:
        raise KdpipeError(f"student {value} is neither a student-train run directory (with final/) "
                          "nor a model folder (with config.json)")
    metrics_file = run_dir / "metrics.jsonl" if run_dir and (run_dir / "metrics.jsonl").is_file() else None
    name = name or _safe_name((run_dir or folder).resolve().name)
    return Model(name, "student", folder.resolve(), run_dir.resolve() if run_dir else None,
                 metrics_file.resolve() if metrics_file else None)


def resolve_teacher(spec: str) -> Model:
    name, value = split_name(spec)
    path = Path(resolve_model_path(value)).expanduser()
    if not path.exists():
        raise KdpipeError(f"teacher {value} does not exist")
    if not (path / "config.json").is_file():
        raise KdpipeError(f"teacher {value} is not a model folder (no config.json)")
    return Model(name or "teacher", "teacher", path.resolve())


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


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
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    files = weights_files(m.path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(
            str(m.path), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise KdpipeError(f"cannot load {m.role} {m.name} from {m.path}: {_first_line(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    m.module = model.eval()
    m.missing_head = list(info.get("missing_keys", []))
    has_tokenizer = any((m.path / f).is_file() for f in TOKENIZER_FILES)
    if has_tokenizer or teacher_tokenizer is None:
        m.tokenizer = load_tokenizer(str(m.path))
    else:
        m.tokenizer = teacher_tokenizer
    m.tokenizer_sha = tokenizer_sha256(m.tokenizer)
    if len(files) == 1:
        digest = sha256_file(files[0])
    else:
        digest = sha256_bytes("".join(f"{f.name}:{sha256_file(f)}\n" for f in files).encode())
    c = model.config
    m.entry = {
        "name": m.name, "role": m.role, "path": str(m.path),
        "run_dir": str(m.run_dir) if m.run_dir else None,
        "metrics_file": str(m.metrics_file) if m.metrics_file else None,
        "weights_files": [f.name for f in files], "weights_bytes": sum(f.stat().st_size for f in files),
        "weights_sha256": digest,
        "parameters": sum(p.numel() for p in model.base_model.parameters()),
        "parameters_with_head": sum(p.numel() for p in model.parameters()),
        "layers": getattr(c, "num_hidden_layers", None) or getattr(c, "n_layers", None),
        "hidden_size": getattr(c, "hidden_size", None) or getattr(c, "dim", None),
        "vocab_size": int(c.vocab_size),
    }


def _check_mlm_compatible(teacher: Model, models: list[Model]) -> None:
    for m in models:
        if m.missing_head:
            raise KdpipeError(f"{m.role} {m.name} ({m.path}) has no trained masked-LM head "
                              f"({len(m.missing_head)} weights missing, e.g. {m.missing_head[0]}); "
                              "its masked-LM scores would be random (leave out --heldout to skip them)")
        if m is teacher:
            continue
        if m.entry["vocab_size"] != teacher.entry["vocab_size"] or m.tokenizer_sha != teacher.tokenizer_sha:
            raise KdpipeError(f"student {m.name} uses another vocabulary than the teacher "
                              f"({m.entry['vocab_size']} vs {teacher.entry['vocab_size']} tokens, or "
                              "another tokenizer): masked-LM comparison needs the same one")


def _overlap_warnings(students: list[Model], heldout: corpus_mod.Corpus) -> list[str]:
    """Best effort: a student whose cache was dumped from a held-out file has seen that text."""
    held = {f["sha256"]: f["name"] for f in heldout.fingerprint.get("files", [])}
    out = []
    for m in students:
        try:
            run = read_json(m.run_dir / "run.json") if m.run_dir else {}
            cache = Path(run["cache"]) if isinstance(run, dict) and "cache" in run else None
            fp_path = cache / "fingerprint.json" if cache else None
            fp = read_json(fp_path) if fp_path and fp_path.is_file() else {}
            seen = {f.get("sha256") for f in fp.get("corpus", {}).get("files", [])}
        except (KdpipeError, OSError, TypeError, AttributeError):
            continue
        for sha in sorted(seen & held.keys()):
            out.append(f"student {m.name} was distilled from a cache made from {held[sha]}, which is "
                       "also held-out text here: its masked-LM scores are not on unseen text")
    return out


def _settings(cfg: EvalConfig, device: torch.device, models: list[Model], tasks: list[downstream.Task],
              heldout: corpus_mod.Corpus | None) -> dict[str, Any]:
    """What every part's result depends on; eval.json holds it and a rerun must match it.

    Only the settings of the sections asked for are included, and `--seeds` is not: each seed is
    its own part, so more seeds later reuse the ones done. Models and inputs are identified by
    content (weights and file hashes), so a moved run directory is still the same student."""
    c = cfg.model_dump(mode="json")
    pick = lambda *keys: {k: c[k] for k in keys}  # noqa: E731
    settings: dict[str, Any] = {"device": str(device)}
    if heldout is not None:
        settings["mlm"] = pick("heldout_text_column", "heldout_sequences", "seq_len", "packing",
                               "mask_prob", "mask_token_prob", "random_token_prob", "mask_seed",
                               "eval_batch_size")
    if tasks:
        settings["downstream"] = pick("text_column", "label_column", "task_split", "split_seed",
                                      "dev_fraction", "max_train_examples", "max_dev_examples", "lr",
                                      "epochs", "batch_size", "max_length", "weight_decay",
                                      "warmup_ratio", "eval_batch_size")
    if cfg.speed:
        settings["speed"] = pick("speed_batch_size", "speed_seq_len", "speed_repeats", "speed_warmup")
    inputs = {
        "models": {m.name: {"role": m.role, "weights_sha256": m.entry["weights_sha256"],
                            "tokenizer_sha256": m.tokenizer_sha} for m in models},
        "tasks": {t.name: t.fingerprint for t in tasks},
        "heldout": heldout.fingerprint if heldout is not None else None,
    }
    return EvalSettings(settings=settings, inputs=inputs).model_dump(mode="json")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def settings_difference(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every leaf that differs, in key order."""
    a, b = _flatten(old), _flatten(new)
    short = lambda v: "(absent)" if v is _ABSENT else (  # noqa: E731
        v[:12] + "…" if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) else json.dumps(v))
    return [f"{k}: {short(a.get(k, _ABSENT))} → {short(b.get(k, _ABSENT))}"
            for k in sorted(a.keys() | b.keys()) if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


_ABSENT = object()


def set_up(cfg: EvalConfig) -> Setup:
    teacher = resolve_teacher(cfg.teacher)
    students = [resolve_student(s) for s in cfg.students]
    names = [teacher.name] + [s.name for s in students]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise KdpipeError(f"two models are named {dupes[0]!r}; name them with --student NAME=PATH")
    if cfg.baseline is not None and cfg.baseline not in names[1:]:
        raise KdpipeError(f"--baseline {cfg.baseline!r} is not a student (students: {', '.join(names[1:])})")
    heldout = None
    if cfg.heldout:
        for h in cfg.heldout:
            looks_like_file = Path(h).suffix.lower() in {".txt", ".text", ".jsonl", ".json", ".parquet"}
            if looks_like_file and not any(c in h for c in "*?[") and not Path(h).exists():
                raise KdpipeError(f"held-out file {h} does not exist (--heldout)")
        try:
            heldout = corpus_mod.resolve_corpus(cfg.heldout, cfg.heldout_text_column)
        except KdpipeError as e:
            raise KdpipeError(f"held-out text (--heldout): {e}") from None
    tasks = []
    for spec in cfg.tasks:
        tname, value = split_name(spec)
        tasks.append(downstream.load_task(value, cfg.text_column, cfg.label_column, cfg.task_split, tname))
    tnames = [t.name for t in tasks]
    if len(set(tnames)) != len(tnames):
        dup = next(n for n in tnames if tnames.count(n) > 1)
        raise KdpipeError(f"two tasks are named {dup!r}; name them with --task NAME=SPEC")
    splits = {t.name: downstream.split_indices(len(t.texts), cfg.dev_fraction, cfg.split_seed,
                                               cfg.max_train_examples, cfg.max_dev_examples) for t in tasks}

    load_model(teacher)
    for s in students:
        load_model(s, teacher.tokenizer)
    models = [teacher, *students]
    warnings = []
    if heldout is not None:
        _check_mlm_compatible(teacher, models)
        warnings += _overlap_warnings(students, heldout)
    device = pick_device(cfg.device)
    settings = _settings(cfg, device, models, tasks, heldout)
    return Setup(cfg, Path(cfg.out), device, models, heldout, tasks, splits, settings,
                 sha256_bytes(dumps_json(settings)), warnings)


def guard_settings(s: Setup) -> bool:
    """Write eval.json, or check it against ours; True when resuming a directory."""
    path = s.out / SETTINGS_NAME
    if not path.exists():
        if any(p.name not in {".lock"} for p in s.out.iterdir()):
            raise KdpipeError(f"{s.out} is not empty and holds no kdpipe eval (no {SETTINGS_NAME}); "
                              "refusing to write into it")
        atomic_write_json(path, s.settings)
        return False
    old = read_json(path)
    if old != s.settings:
        diffs = settings_difference(old, s.settings)
        more = f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
        raise KdpipeError(f"{s.out} holds an eval made with other settings ({'; '.join(diffs[:6])}{more}); "
                          "use another --out, or delete that directory to start over")
    return True


# ----------------------------------------------------------------------------------------- parts

def part_path(out: Path, key: str) -> Path:
    """parts/speed.json, parts/mlm/<model>.json, parts/task/<task>/<model>/seed<k>.json."""
    return out / PARTS_DIR / f"{key}.json"


def read_part(s: Setup, key: str) -> dict[str, Any] | None:
    """A finished unit's data, or None when it is missing or unusable (then it is redone)."""
    path = part_path(s.out, key)
    if not path.is_file():
        return None
    try:
        part = Part.model_validate(read_json(path))
    except (KdpipeError, ValidationError):
        return None
    if part.key != key or part.settings_sha256 != s.settings_sha:
        return None
    return part.data


def write_part(s: Setup, kind: str, key: str, data: dict[str, Any]) -> None:
    path = part_path(s.out, key)
    ensure_dir(path.parent, "report directory")
    part = Part(kind=kind, key=key, settings_sha256=s.settings_sha, data=data)
    atomic_write_json(path, part.model_dump(mode="json"))


def say(msg: str) -> None:
    click.echo(f"[eval] {msg}", err=True)


# ------------------------------------------------------------------------------------- run: speed

def measure_speed(s: Setup) -> dict[str, Any]:
    """Batch-1 latency and larger-batch throughput of every model's encoder, interleaved.

    Every repeat times each model once, in an order rotated by one each repeat, so a slow phase
    of a shared machine falls on all models alike; the median of the repeats is reported."""
    cfg, dev = s.cfg, s.device
    tok = s.teacher.tokenizer
    vocab = min(m.entry["vocab_size"] for m in s.models)
    specials = set(tok.all_special_ids)
    pool = torch.tensor([i for i in range(vocab) if i not in specials], dtype=torch.long)
    g = torch.Generator().manual_seed(0)

    def batch(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = pool[torch.randint(len(pool), (b, cfg.speed_seq_len), generator=g)]  # (B, T)
        ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
        return ids.to(dev), torch.ones_like(ids, device=dev)

    one, big = batch(1), batch(cfg.speed_batch_size)
    encoders = {m.name: m.module.to(dev).base_model for m in s.models}

    def timed(name: str, inputs: tuple[torch.Tensor, torch.Tensor]) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast(dev):
            encoders[name](input_ids=inputs[0], attention_mask=inputs[1])
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    names = list(encoders)
    for _ in range(cfg.speed_warmup):
        for n in names:
            timed(n, one)
            timed(n, big)
    lat: dict[str, list[float]] = {n: [] for n in names}
    thr: dict[str, list[float]] = {n: [] for n in names}
    for r in range(cfg.speed_repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            lat[n].append(1000 * timed(n, one))
        for n in order:
            thr[n].append(cfg.speed_batch_size / timed(n, big))
    return {"device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
            "torch_threads": torch.get_num_threads(), "latency_ms": lat, "throughput": thr}


# ----------------------------------------------------------------------------------- run: masked LM

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def heldout_batches(s: Setup) -> tuple[list[Batch], int, int]:
    """The held-out sequences, masked once (seed, sequence id, view 0), in padded batches:
    (input_ids (B, T), attention_mask (B, T), masked-position mask (B, T) bool, labels (N,))."""
    cfg, tok = s.cfg, s.teacher.tokenizer
    seqs = list(itertools.islice(
        corpus_mod.iter_sequences(s.heldout, tok, cfg.seq_len, cfg.packing), cfg.heldout_sequences))
    if not seqs:
        raise KdpipeError(f"held-out text {', '.join(cfg.heldout)} holds no text")
    special = np.array(sorted(set(tok.all_special_ids)), dtype=np.int64)
    vocab = Vocabulary(s.teacher.entry["vocab_size"], tok.mask_token_id, special)
    pool = vocab.random_pool()
    masked = [mask_sequence(seq, i, 0, cfg.masking(), vocab, pool) for i, seq in enumerate(seqs)]
    order = sorted(range(len(masked)), key=lambda i: (-len(masked[i].input_ids), i))
    batches = []
    for b in range(0, len(order), cfg.eval_batch_size):
        rows = [masked[i] for i in order[b:b + cfg.eval_batch_size]]
        ids, att = downstream.pad_batch([r.input_ids.tolist() for r in rows], tok.pad_token_id)
        sel = torch.zeros_like(ids, dtype=torch.bool)
        for j, r in enumerate(rows):
            sel[j, torch.from_numpy(r.positions)] = True
        labels = torch.from_numpy(np.concatenate([r.labels for r in rows])).long()
        if labels.numel():
            batches.append((ids, att, sel, labels))
    if not batches:
        raise KdpipeError("held-out text gives no maskable tokens")
    return batches, len(seqs), sum(len(x) for x in seqs)


@torch.inference_mode()
def masked_logits(model: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor, sel: torch.Tensor,
                  device: torch.device) -> torch.Tensor:
    """(N, V) float32 logits at the masked positions only: the decoder runs on N rows, not B*T."""
    dec = decoder_of(model)
    with autocast(device), decoder_bypassed(model):
        x = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits  # (B, T, H')
    return dec(x[sel.to(device)].float()).float()  # (N, V); row-major order of (b, t), as labels


def mlm_eval(s: Setup, pending: list[Model]) -> dict[str, dict[str, Any]]:
    """One pass over the held-out batches scoring every pending model against the teacher."""
    batches, n_seq, n_tok = heldout_batches(s)
    teacher = s.teacher.module.to(s.device)
    sums = {m.name: metrics.MlmSums() for m in pending}
    seconds = {m.name: 0.0 for m in pending}
    for ids, att, sel, labels in batches:
        labels = labels.to(s.device)
        t0 = time.perf_counter()
        zt = masked_logits(teacher, ids, att, sel, s.device)
        t_teacher = time.perf_counter() - t0
        for m in pending:
            if m.role == "teacher":
                sums[m.name].add(zt, labels)
                seconds[m.name] += t_teacher
                continue
            t0 = time.perf_counter()
            z = masked_logits(m.module.to(s.device), ids, att, sel, s.device)
            seconds[m.name] += time.perf_counter() - t0
            sums[m.name].add(z, labels, zt)
    return {name: {**sums[name].result(), "model": name, "seconds": round(seconds[name], 3),
                   "sequences": n_seq, "tokens": n_tok} for name in sums}


# ------------------------------------------------------------------------------------------- run

def task_key(task: str, model: str, seed: int) -> str:
    return f"task/{task}/{model}/seed{seed}"


def run(s: Setup) -> dict[str, int]:
    """Every unit not yet in parts/: speed, masked LM, fine-tunes. Returns done/reused counts."""
    done = reused = 0
    if s.cfg.speed:
        if read_part(s, "speed") is None:
            say(f"speed: {len(s.models)} models interleaved, {s.cfg.speed_repeats} repeats")
            write_part(s, "speed", "speed", measure_speed(s))
            done += 1
        else:
            reused += 1
    if s.heldout is not None:
        pending = [m for m in s.models if read_part(s, f"mlm/{m.name}") is None]
        reused += len(s.models) - len(pending)
        if pending:
            say(f"masked LM on held-out text: {', '.join(m.name for m in pending)}")
            for name, data in mlm_eval(s, pending).items():
                write_part(s, "mlm", f"mlm/{name}", data)
                done += 1
    encoded: dict[tuple[str, str], downstream.Encoded] = {}
    recipe = s.cfg.recipe()
    for seed in range(s.cfg.seeds):
        for task in s.tasks:
            for m in s.models:
                key = task_key(task.name, m.name, seed)
                if read_part(s, key) is not None:
                    reused += 1
                    continue
                ek = (task.name, m.tokenizer_sha)
                if ek not in encoded:
                    encoded[ek] = downstream.encode_task(m.tokenizer, task, s.splits[task.name],
                                                         s.cfg.max_length)
                m.module.cpu()  # fine-tuning loads its own copy; free the accelerator
                result = downstream.finetune_and_score(str(m.path), m.tokenizer.pad_token_id,
                                                       encoded[ek], task.label_names, recipe, seed, s.device)
                write_part(s, "task", key, {**result, "model": m.name, "task": task.name})
                done += 1
                say(f"{task.name} | {m.name} | seed {seed}: accuracy {result['accuracy']:.4f}, "
                    f"macro-F1 {result['macro_f1']:.4f} ({result['train_seconds']:.1f} s)")
    return {"computed": done, "reused": reused}


# ---------------------------------------------------------------------------------------- finish

def _spread(values: list[float]) -> Spread:
    sp = metrics.median_spread(values)
    return Spread(median=sp.median, min=sp.min, max=sp.max, values=sp.values)


def _part(s: Setup, key: str) -> dict[str, Any]:
    data = read_part(s, key)
    if data is None:  # run() wrote every part; only a concurrent deletion gets here
        raise KdpipeError(f"part {part_path(s.out, key)} is missing; rerun the same command")
    return data


def _speed_section(s: Setup) -> SpeedSection:
    d = _part(s, "speed")
    lat = {n: _spread(v) for n, v in d["latency_ms"].items()}
    thr = {n: _spread(v) for n, v in d["throughput"].items()}
    t = s.teacher.name
    results = [SpeedResult(model=m.name, latency_ms=lat[m.name], throughput=thr[m.name],
                           latency_speedup=metrics.speedup(lat[m.name].median, lat[t].median),
                           throughput_speedup=metrics.speedup(1 / thr[m.name].median, 1 / thr[t].median))
               for m in s.models]
    c = s.cfg
    return SpeedSection(device=d["device"], torch_threads=d["torch_threads"], what=SPEED_WHAT,
                        seq_len=c.speed_seq_len, batch_size=c.speed_batch_size,
                        repeats=c.speed_repeats, warmup=c.speed_warmup, results=results)


def _mlm_section(s: Setup) -> MlmSection:
    parts = {m.name: _part(s, f"mlm/{m.name}") for m in s.models}
    fields = set(MlmResult.model_fields)
    results = [MlmResult(**{k: v for k, v in parts[m.name].items() if k in fields}) for m in s.models]
    t = parts[s.teacher.name]
    c = s.cfg
    return MlmSection(
        heldout=s.heldout.fingerprint, sequences=t["sequences"], tokens=t["tokens"], seq_len=c.seq_len,
        packing=c.packing,
        masking={"mask_prob": c.mask_prob, "mask_token_prob": c.mask_token_prob,
                 "random_token_prob": c.random_token_prob, "seed": c.mask_seed, "view": 0},
        results=results,
        top1_retention={m.name: metrics.retention(parts[m.name]["top1_accuracy"], t["top1_accuracy"])
                        for m in s.students})


def _task_section(s: Setup, task: downstream.Task) -> TaskSection:
    seeds = list(range(s.cfg.seeds))
    per_model = {m.name: [SeedScore(**{k: v for k, v in _part(s, task_key(task.name, m.name, k_)).items()
                                       if k in SeedScore.model_fields}) for k_ in seeds]
                 for m in s.models}
    acc = {n: _spread([x.accuracy for x in v]) for n, v in per_model.items()}
    f1 = {n: _spread([x.macro_f1 for x in v]) for n, v in per_model.items()}
    t = s.teacher.name
    kept = lambda sp, n: None if n == t else metrics.retention(sp[n].median, sp[t].median)  # noqa: E731
    results = [TaskModelResult(model=n, seeds=v, accuracy=acc[n], macro_f1=f1[n],
                               accuracy_retention=kept(acc, n), macro_f1_retention=kept(f1, n))
               for n, v in per_model.items()]
    sp = s.splits[task.name]
    return TaskSection(
        name=task.name, spec=task.spec, fingerprint=task.fingerprint, text_column=task.text_column,
        label_column=task.label_column, labels=task.label_names, label_counts=task.label_counts(),
        dropped_rows=task.dropped, split=TaskSplit(**sp.record(len(task.texts), _split_file(task.name))),
        recipe={**s.cfg.recipe().__dict__, "seeds": seeds, "optimizer": "AdamW",
                "schedule": "linear warm-up, linear decay", "grad_clip": 1.0,
                "model": "AutoModelForSequenceClassification"},
        results=results)


def _ablation(s: Setup, tasks: list[TaskSection]) -> tuple[str | None, list[AblationRow]]:
    if not tasks or len(s.students) < 2:
        return None, []
    base = s.cfg.baseline or s.students[0].name
    macro = {m.name: statistics.fmean(_task_result_acc(t, m.name) for t in tasks) for m in s.models}
    rows = [AblationRow(model=m.name, macro_accuracy=macro[m.name],
                        delta_points=None if m.role == "teacher" else 100 * (macro[m.name] - macro[base]),
                        retention=metrics.retention(macro[m.name], macro[s.teacher.name]))
            for m in s.models]
    return base, rows


def _task_result_acc(t: TaskSection, model: str) -> float:
    return next(r.accuracy.median for r in t.results if r.model == model)


def _split_file(task: str) -> str:
    return f"{SPLITS_DIR}/{task}.json"


def write_splits(s: Setup) -> None:
    ensure_dir(s.out / SPLITS_DIR, "report directory")
    for t in s.tasks:
        sp = s.splits[t.name]
        atomic_write_json(s.out / _split_file(t.name), {
            "task": t.name, "spec": t.spec, "method": downstream.SPLIT_METHOD, "seed": sp.seed,
            "dev_fraction": sp.dev_fraction, "examples": len(t.texts), "train": sp.train, "dev": sp.dev})


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


def finish(s: Setup) -> Report:
    tasks = [_task_section(s, t) for t in s.tasks]
    base, ablation = _ablation(s, tasks)
    report = Report(
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        teacher=s.teacher.name, students=[m.name for m in s.students], baseline=base,
        models=[ModelEntry(**m.entry) for m in s.models],
        mlm=_mlm_section(s) if s.heldout is not None else None,
        speed=_speed_section(s) if s.cfg.speed else None,
        tasks=tasks, ablation=ablation, warnings=s.warnings,
        provenance={**provenance(s.cfg), "settings_sha256": s.settings_sha},
    )
    plots = {
        render.CURVES_NAME: render.plot_training_curves({m.name: read_curves(m) for m in s.students
                                                         if m.metrics_file}),
        render.RETENTION_NAME: render.plot_retention(report),
        render.TRADEOFF_NAME: render.plot_tradeoff(report),
    }
    for name, png in plots.items():
        if png is not None:
            atomic_write_bytes(s.out / name, png)
    report = report.model_copy(update={"plots": [n for n, png in plots.items() if png is not None]})
    atomic_write_bytes(s.out / MARKDOWN_NAME, render.render_markdown(report).encode())
    atomic_write_json(s.out / REPORT_NAME, report.model_dump(mode="json"))  # last: the commit point
    return report


def main(cfg: EvalConfig) -> dict[str, Any]:
    """The whole stage; returns a summary for the CLI to print."""
    s = set_up(cfg)
    ensure_dir(s.out, "report directory")
    with exclusive_lock(s.out, "report directory"):
        for d in (s.out, s.out / PARTS_DIR, *(p for p in (s.out / PARTS_DIR).rglob("*") if p.is_dir())):
            remove_stale_tmp(d)
        resumed = guard_settings(s)
        for w in s.warnings:
            say(f"warning: {w}")
        write_splits(s)
        counts = run(s)
        report = finish(s)
    summary: dict[str, Any] = {"report": str(s.out / MARKDOWN_NAME), "resumed": resumed, **counts}
    for t in report.tasks:
        summary[f"{t.name}_accuracy_retention"] = {r.model: None if r.accuracy_retention is None
                                                   else round(r.accuracy_retention, 1)
                                                   for r in t.results if r.model != report.teacher}
    if report.speed:
        summary["latency_speedup"] = {r.model: round(r.latency_speedup, 2) for r in report.speed.results
                                      if r.model != report.teacher and r.latency_speedup}
    return summary


@click.command("eval", epilog="Example: kdpipe eval --teacher ./teacher --student runs/full "
               "--student no-ce=runs/no-ce --heldout heldout.txt --task builtin:movie-sentiment "
               "--out reports/r1 --seeds 3 --max-train-examples 2000")
@config_option
@click.option("--teacher", help="Teacher model folder (or builtin:NAME, or NAME=PATH).")
@click.option("--student", "students", multiple=True, help="A student-train run directory (its "
              "final/ model and metrics.jsonl) or a model folder; NAME=PATH names it (default: the "
              "directory name). Repeatable.")
@click.option("--task", "tasks", multiple=True, help="Labelled classification data: a CSV/TSV/"
              "JSON(L)/Parquet file, a dataset available offline (name or name:config), or "
              "builtin:NAME; NAME=SPEC names it. Repeatable.")
@click.option("--heldout", multiple=True, help="Held-out text (files, globs or folders, or a "
              "dataset) for the masked-LM scores; text the students never trained on. Repeatable.")
@click.option("--out", help="Report directory to create or resume.")
@click.option("--baseline", help="Student the ablation table compares against. [first student]")
@click.option("--heldout-sequences", type=int, help="Held-out sequences scored. [256]")
@click.option("--heldout-text-column", help="Text column of JSONL/Parquet held-out data. [text]")
@click.option("--seq-len", type=int, help="Tokens per held-out sequence. [128]")
@click.option("--packing", type=click.Choice(["pack", "line"]), help="Held-out packing. [pack]")
@click.option("--mask-prob", type=float, help="Share of held-out tokens masked. [0.15]")
@click.option("--mask-token-prob", type=float, help="Of those, share set to [MASK]. [0.8]")
@click.option("--random-token-prob", type=float, help="Of those, share set to a random token. [0.1]")
@click.option("--mask-seed", type=int, help="Seed of the held-out masks. [0]")
@click.option("--text-column", help="Text column of the task files. [text]")
@click.option("--label-column", help="Label column of the task files. [label]")
@click.option("--task-split", help="Split of a named dataset task. [train]")
@click.option("--seeds", type=int, help="Fine-tuning seeds per (model, task); the report gives the "
              "median and min-max. [3]")
@click.option("--split-seed", type=int, help="Seed of the train/dev split. [0]")
@click.option("--dev-fraction", type=float, help="Share of each task held out as dev set. [0.1]")
@click.option("--max-train-examples", type=int, help="Fine-tune on at most N examples.")
@click.option("--max-dev-examples", type=int, help="Score on at most N dev examples.")
@click.option("--lr", type=float, help="Fine-tuning learning rate (AdamW). [5e-5]")
@click.option("--epochs", type=int, help="Fine-tuning epochs. [3]")
@click.option("--batch-size", type=int, help="Fine-tuning batch size. [32]")
@click.option("--max-length", type=int, help="Fine-tuning max tokens per example. [128]")
@click.option("--weight-decay", type=float, help="AdamW weight decay. [0.01]")
@click.option("--warmup-ratio", type=float, help="Share of steps of linear warm-up. [0.1]")
@click.option("--eval-batch-size", type=int, help="Batch size of scoring. [64]")
@click.option("--speed/--no-speed", default=None, help="Measure latency and throughput. [on]")
@click.option("--speed-batch-size", type=int, help="Batch size of the throughput test. [32]")
@click.option("--speed-seq-len", type=int, help="Tokens per sequence of the speed test. [128]")
@click.option("--speed-repeats", type=int, help="Timed repeats per model (median reported). [10]")
@click.option("--speed-warmup", type=int, help="Untimed warm-up calls per model. [2]")
@click.option("--device", help="auto, cpu, cuda, cuda:N. [auto]")
def command(config_file: Path | None, **flags: Any) -> None:
    """Compare teacher and students: masked LM, downstream fine-tuning, size and speed."""
    echo_json(main(build_config(EvalConfig, config_file, flags)))
