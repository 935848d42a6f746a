"""`kdpipe student-train`: train a smaller student from a teacher cache, never running the teacher.

    kdpipe student-train --cache caches/wiki --out runs/l3 --teacher ./bert-mlm \
        --student-layers 3 --max-steps 2000 --batch-size 32 --save-every 200
    torchrun --nproc-per-node 2 "$(which kdpipe)" student-train ...   # DDP; --batch-size is global

Set up (read the cache's manifest and teacher config, resolve the student and check everything
against the cache before touching the run directory), run (stream the cache, one student forward
per batch, the three DistilBERT losses, AdamW with warm-up and linear decay, atomic checkpoints),
finish (the student as a plain `save_pretrained` folder in RUN_DIR/final). To resume after any
interruption, `kill -9` included, rerun the same command: it continues from the latest checkpoint
and ends, on CPU, with the same weights bit for bit as a run that was never interrupted.

Every checkpoint is also a `save_pretrained` folder, and `--init-from` starts a student from any
such folder. The length of a run (--max-steps, --epochs) may change on a rerun, a finished run's
included: it continues from its latest checkpoint (one is always written at the last step) with
the learning-rate schedule of the new length, as if it had been planned from the start, the
rule transformers' Trainer follows when max_steps is raised on a resume (warm-up over the new
length's share, then linear decay to 0 at the new last step). run.json records each change.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import click
import torch
from pydantic import Field, ValidationError, model_validator
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from kdpipe import __version__
from kdpipe.pipeline import cache as cachedir
from kdpipe.pipeline import checkpoint as ckpt
from kdpipe.pipeline import distributed, layer_targets, model_card, relation_targets
from kdpipe.pipeline import storage
from kdpipe.pipeline import student as stu
from kdpipe.pipeline.compiling import CompileSettings, compile_options
from kdpipe.pipeline.config import (
    MAX_SEED, build_config, config_option, echo_json, floats_option, ints_option,
)
from kdpipe.pipeline.cores import MAX_WORKERS, default_workers
from kdpipe.pipeline.device import configure, pick_device
from kdpipe.pipeline.errors import CacheMismatchError, CorruptCacheError, KdpipeError, tensor_file_errors
from kdpipe.pipeline.fsutil import (
    TMP_SUFFIX, atomic_dir, atomic_write_bytes, atomic_write_json, disk_errors, dumps_json, ensure_dir,
    exclusive_lock,
    read_json, remove_stale_tmp, safe_join, sha256_bytes,
)
from kdpipe.pipeline.loader import Batch, LoaderSpec, batches_per_epoch, iter_batches
from kdpipe.pipeline.losses import (
    DEFAULT_ALPHA_LAYER_COS, DEFAULT_ALPHA_RELATION, REFERENCE_ALPHA_CE, REFERENCE_ALPHA_COS, REFERENCE_ALPHA_MLM, REFERENCE_TEMPERATURE,
    LossSpec,
)
from kdpipe.pipeline.modes import get_mode
from kdpipe.pipeline.prefetch import Prefetcher
from kdpipe.pipeline.projection import load_layer_projections, load_projection
from kdpipe.pipeline.provenance import code_revision, package_versions
from kdpipe.pipeline.schedule import lr_at, warmup_steps
from kdpipe.pipeline.trainer import (
    WINDOW_KEYS, NonFiniteError, Optim, TeacherHead, Trainer, build_trainer, metrics_line, train_step,
    train_step_ddp, truncate_jsonl, wrap_ddp,
)
from kdpipe.schemas.checkpoint import (
    FINAL_DIR, FINAL_HIDDEN_MAP_NAME, METRICS_NAME, RUN_NAME, SAMPLES_NAME, STUDENT_RECORD_NAME,
    TENSORBOARD_DIR, Position, RunRecord,
)
from kdpipe.schemas.manifest import Manifest

# DistilBERT reference (examples/research_projects/distillation/train.py and distiller.py):
REFERENCE_LR = 5e-4  # --learning_rate
REFERENCE_WARMUP_PROP = 0.05  # --warmup_prop
REFERENCE_WEIGHT_DECAY = 0.0  # --weight_decay
REFERENCE_ADAM_EPS = 1e-6  # --adam_epsilon
REFERENCE_BETAS = (0.9, 0.98)  # AdamW(betas=(0.9, 0.98)) in Distiller.__init__
REFERENCE_MAX_GRAD_NORM = 5.0  # --max_grad_norm
REFERENCE_EPOCHS = 3  # --n_epoch
DEFAULT_BATCH_SIZE = 32

# Settings that change how a run is operated, not what it computes: free to differ on resume.
# (init_from is checked by its weights' hash, recorded in the identity instead of its path.)
OPERATIONAL = ("cache", "out", "teacher", "device", "save_every", "keep_checkpoints", "log_every",
               "prefetch", "record_samples", "init_from", "report_to", "loader_workers")
# The run's length: may change on a rerun (the schedule follows the new length, see above).
LENGTH = ("max_steps", "epochs")
# Recorded in a run's identity as one torch_compile entry, and only when compiling (so a run
# started before the option existed still resumes).
COMPILE_KEYS = ("torch_compile", "torch_compile_backend", "torch_compile_mode")


class StudentConfig(CompileSettings):
    cache: str
    out: str
    teacher: str | None = None
    init: Literal["teacher", "random", "pretrained"] = "teacher"
    init_from: str | None = None  # a save_pretrained folder (init=pretrained)
    layer_map: list[int] | None = None
    student_arch: Literal["teacher", "distilbert"] = "teacher"
    student_config: str | None = None
    student_layers: int | None = Field(None, ge=1)
    student_hidden: int | None = Field(None, ge=1)
    student_heads: int | None = Field(None, ge=1)
    student_intermediate: int | None = Field(None, ge=1)
    alpha_ce: float = Field(REFERENCE_ALPHA_CE, ge=0)
    alpha_mlm: float = Field(REFERENCE_ALPHA_MLM, ge=0)
    alpha_cos: float = Field(REFERENCE_ALPHA_COS, ge=0)
    alpha_layer_cos: float = Field(DEFAULT_ALPHA_LAYER_COS, ge=0)  # recorded in the identity only when > 0
    alpha_relation: float = Field(DEFAULT_ALPHA_RELATION, ge=0)  # recorded in the identity only when > 0
    relation_heads: int | None = Field(None, ge=1)  # L_rel's relation heads [the teacher's attention heads]
    temperature: float = Field(REFERENCE_TEMPERATURE, gt=0)
    ce_masked_only: bool = False
    max_steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    batch_size: int | None = Field(None, ge=1)
    batch_tokens: int | None = Field(None, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(REFERENCE_LR, gt=0)
    warmup: float = Field(REFERENCE_WARMUP_PROP, ge=0, lt=1)
    weight_decay: float = Field(REFERENCE_WEIGHT_DECAY, ge=0)
    adam_betas: list[float] = Field(default_factory=lambda: list(REFERENCE_BETAS), min_length=2, max_length=2)
    adam_eps: float = Field(REFERENCE_ADAM_EPS, gt=0)
    max_grad_norm: float = Field(REFERENCE_MAX_GRAD_NORM, ge=0)  # 0: no clipping
    shuffle_window: int = Field(4, ge=1)
    save_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    prefetch: int = Field(4, ge=0)  # 0: decode batches in the training thread
    loader_workers: int = Field(default_factory=lambda: default_workers(4), ge=1, le=MAX_WORKERS)
    device: str = "auto"
    record_samples: bool = False
    report_to: Literal["none", "tensorboard"] = "none"  # transformers' report_to; metrics.jsonl always
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    tf32: bool = False

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if data.get("max_steps") is None and data.get("epochs") is None:
                data["epochs"] = REFERENCE_EPOCHS
            if data.get("batch_size") is None and data.get("batch_tokens") is None:
                data["batch_size"] = DEFAULT_BATCH_SIZE
            if data.get("init_from") and data.get("init") is None:
                data["init"] = "pretrained"
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "StudentConfig":
        problems = []
        if self.alpha_ce == self.alpha_mlm == self.alpha_cos == self.alpha_layer_cos == self.alpha_relation == 0:
            problems.append("alpha_ce, alpha_mlm, alpha_cos, alpha_layer_cos and alpha_relation are all 0: "
                            "there is nothing to train")
        if self.relation_heads is not None and not self.alpha_relation:
            problems.append("relation_heads goes with alpha_relation > 0")
        if self.max_steps is not None and self.epochs is not None:
            problems.append("give max_steps or epochs, not both")
        if self.batch_size is not None and self.batch_tokens is not None:
            problems.append("give batch_size or batch_tokens, not both")
        if self.layer_map is not None and self.init != "teacher":
            problems.append("layer_map only applies to init=teacher")
        if (self.init == "pretrained") != bool(self.init_from):
            problems.append("init_from (a model folder) goes with init=pretrained, and only with it")
        if self.init_from:
            shaped = [k for k in ("student_config", "student_layers", "student_hidden", "student_heads",
                                  "student_intermediate") if getattr(self, k) is not None]
            if self.student_arch != "teacher":
                shaped.append("student_arch")
            if shaped:
                problems.append(f"init_from takes the architecture from its folder: drop {', '.join(shaped)}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            problems.append("adam_betas must lie in [0, 1)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass
class Setup:
    cfg: StudentConfig
    cache: Path
    out: Path
    manifest: Manifest
    teacher_config: dict[str, Any]
    projection: torch.Tensor  # (H_teacher, d)
    layer_pairs: tuple[tuple[int, int], ...]  # L_layer: (student hidden_states index, cached block); () when off
    layer_projections: list[torch.Tensor] | None  # L_layer: each pair's (H_teacher, d) projection
    relation: tuple[int, str] | None  # L_rel: (the student's matched block, 0-based; the cache's parts); None when off
    relation_heads: int  # L_rel: R (0 when off)
    teacher_head: TeacherHead | None  # exact mode: decoder (V, H'), (V,)
    student_config: Any  # a transformers config
    layer_map: list[int] | None
    teacher_path: str | None  # for init (checked against the fingerprint) and the tokenizer
    identity: dict[str, Any]
    identity_sha: str
    loader: LoaderSpec
    total_steps: int
    device: torch.device

    @property
    def optim(self) -> Optim:
        c = self.cfg
        return Optim(c.lr, tuple(c.adam_betas), c.adam_eps, c.weight_decay, c.max_grad_norm, c.grad_accum)


def loss_spec(s: Setup) -> LossSpec:
    c = s.cfg
    return LossSpec(c.alpha_ce, c.alpha_mlm, c.alpha_cos, c.temperature, c.ce_masked_only,
                    s.manifest.targets, s.manifest.target_positions, c.alpha_layer_cos, s.layer_pairs,
                    c.alpha_relation, s.relation[0] if s.relation else 0,
                    len(s.relation[1]) if s.relation else 0, s.relation_heads)


# ---------------------------------------------------------------------------------------- set up

def _cache_file_json(cache: Path, manifest: Manifest) -> dict[str, Any]:
    problem = cachedir.check_file(cache, manifest.teacher_config)
    if problem:
        raise CorruptCacheError(f"corrupt cache: {cache / problem.path}: {problem.what}")
    return read_json(cache / manifest.teacher_config.path)


def _checked(cache: Path, entry: Any) -> Path:
    problem = cachedir.check_file(cache, entry)
    if problem:
        raise CorruptCacheError(f"corrupt cache: {cache / problem.path}: {problem.what}")
    return safe_join(cache, entry.path)


def _mode_problems(cfg: StudentConfig, m: Manifest) -> list[str]:
    """Settings this cache's target mode cannot serve, each with what to do instead."""
    mode = get_mode(m.targets)
    out = mode.train_problems(alpha_ce=cfg.alpha_ce, alpha_cos=cfg.alpha_cos, temperature=cfg.temperature,
                              temperatures=tuple(m.temperatures))
    if mode.columns and cfg.alpha_ce > 0 and m.target_positions == "masked" and not cfg.ce_masked_only:
        out.append("this cache holds targets at masked positions only: pass --ce-masked-only "
                   "(or dump with --target-positions all)")
    return out


def _teacher_path(cfg: StudentConfig, cache: Path) -> str | None:
    """--teacher; for init=teacher without it, the path the dump recorded in run_info.json if it
    exists here. With init=random and no --teacher nothing of the teacher is read (no tokenizer)."""
    if cfg.teacher:
        return cfg.teacher
    info = cache / cachedir.RUN_INFO_NAME
    if cfg.init == "teacher" and info.is_file():
        recorded = (read_json(info).get("config") or {}).get("teacher")
        if isinstance(recorded, str) and (recorded.startswith("builtin:") or Path(recorded).exists()):
            return recorded
    return None


def set_up(cfg: StudentConfig) -> Setup:
    """Every check that needs only the cache and the config; writes nothing."""
    cache, out = Path(cfg.cache), Path(cfg.out)
    manifest = cachedir.load_manifest(cache)
    teacher_config = _cache_file_json(cache, manifest)
    width = int(teacher_config["hidden_size"])
    projection = load_projection(_checked(cache, manifest.projection)) if manifest.projection \
        else torch.eye(width)  # mode none: no hidden targets, the map is never used
    teacher_head = None
    if manifest.head is not None:  # exact mode: the frozen decoder that rebuilds the teacher's logits
        head_path = _checked(cache, manifest.head)
        with tensor_file_errors(head_path):
            tensors = load_file(str(head_path))
            teacher_head = (tensors["weight"], tensors.get("bias"))
    cachedir.check_shard_sizes(cache, manifest)  # cheap now; each shard's hash is checked when opened

    problems = _mode_problems(cfg, manifest) + _tensorboard_problem(cfg)
    t_index = next((i for i, t in enumerate(manifest.temperatures) if math.isclose(t, cfg.temperature)), 0)
    override = None
    if cfg.student_config:
        p = Path(cfg.student_config)
        if not p.is_file():
            raise KdpipeError(f"--student-config {p} does not exist")
        override = read_json(p)
        if not isinstance(override, dict):
            raise KdpipeError(f"--student-config {p} must hold a JSON object")
    if cfg.init_from:
        scfg, init_sha = stu.pretrained_config(Path(cfg.init_from))
    else:
        scfg = stu.student_config(teacher_config, override, cfg.student_layers, cfg.student_hidden,
                                  cfg.student_heads, cfg.student_intermediate, cfg.student_arch)
    if int(scfg.vocab_size) != manifest.vocab_size:
        problems.append(f"the student's vocabulary has {scfg.vocab_size} tokens but the cache's has "
                        f"{manifest.vocab_size}: its logits cannot be compared with the teacher's")
    layer_map = None
    t_layers, s_layers = int(teacher_config["num_hidden_layers"]), int(scfg.num_hidden_layers)
    teacher_path = _teacher_path(cfg, cache)
    if cfg.teacher and not cfg.teacher.startswith("builtin:") and not Path(cfg.teacher).exists():
        problems.append(f"--teacher {cfg.teacher} does not exist")
    if cfg.init == "teacher":
        if cfg.layer_map is None and s_layers > t_layers:
            problems.append(f"the student has {s_layers} layers, more than the teacher's {t_layers}: --init teacher "
                            "would copy some teacher layers twice; give --layer-map to repeat them on purpose, "
                            "or use --init random")
        layer_map = list(cfg.layer_map) if cfg.layer_map is not None else stu.default_layer_map(
            t_layers, s_layers)
        problems += stu.check_layer_map(layer_map, t_layers, int(scfg.num_hidden_layers))
    pairs: list[tuple[int, int]] = []
    matching = layer_map or stu.default_layer_map(t_layers, s_layers)
    if cfg.alpha_layer_cos > 0 and len(matching) == s_layers:  # the student's layers matched to the cache's
        pairs = layer_targets.matched(matching, s_layers)
        problems += layer_targets.train_problems(pairs, manifest.hidden_layers, s_layers)
    relation, heads = None, 0
    if cfg.alpha_relation > 0:
        rel = manifest.relation
        block = rel and relation_targets.student_layer(rel.layer, t_layers, matching, s_layers)
        heads = cfg.relation_heads or (rel.heads if rel else 1)
        problems += relation_targets.train_problems(rel, heads, int(scfg.hidden_size), block, matching)
        relation = (block, rel.parts) if rel and block is not None else None
    if problems:
        raise KdpipeError("; ".join(problems))

    resolved = cfg.model_dump(mode="json")
    resolved["layer_map"] = layer_map
    student_dict = json.loads(scfg.to_json_string())
    student_dict.pop("transformers_version", None)
    identity = {k: v for k, v in resolved.items() if k not in OPERATIONAL + LENGTH + COMPILE_KEYS}
    if not cfg.alpha_layer_cos:  # a run from before L_layer existed resumes
        identity.pop("alpha_layer_cos")
    for key in ("alpha_relation", "relation_heads"):  # likewise L_rel: recorded only when on
        identity.pop(key)
    if cfg.alpha_relation:
        identity.update(alpha_relation=cfg.alpha_relation, relation_heads=heads)  # the resolved R
    identity.update(cfg.compile_record())  # compiling may change float results: a resume repeats it
    identity["student_config"] = student_dict
    if cfg.init_from:
        identity["init_from_weights_sha256"] = init_sha
    loader = LoaderSpec(seed=cfg.seed, window=cfg.shuffle_window, batch_size=cfg.batch_size,
                        batch_tokens=cfg.batch_tokens, temperature_index=t_index,
                        pad_id=int(teacher_config.get("pad_token_id") or 0))
    if cfg.max_steps is not None:
        total = cfg.max_steps
    else:
        total = -(-sum(batches_per_epoch(cache, manifest, loader, cfg.epochs)) // cfg.grad_accum)
    device = distributed.local_device(pick_device(cfg.device), distributed.world())
    if teacher_head is not None:
        teacher_head = (teacher_head[0].to(device), None if teacher_head[1] is None else teacher_head[1].to(device))
    layer_projections = None
    if pairs:
        stack = load_layer_projections(_checked(cache, manifest.projection))  # (n, H, d)
        layer_projections = [stack[manifest.hidden_layers.index(t)] for _, t in pairs]
    return Setup(cfg, cache, out, manifest, teacher_config, projection,
                 layer_targets.columns(pairs, manifest.hidden_layers), layer_projections, relation, heads,
                 teacher_head, scfg,
                 layer_map, teacher_path, identity, sha256_bytes(dumps_json(identity)), loader, total, device)


def check_run_dir(s: Setup) -> RunRecord | None:
    """The run this directory holds (to resume), None for a new run; refuses anything else.
    Read-only: a refused directory is left exactly as it was."""
    out = s.out
    if out.exists() and not out.is_dir():
        raise KdpipeError(f"run directory {out} exists and is not a directory")
    if not out.exists():
        return None
    record_path = out / RUN_NAME
    if not record_path.is_file():
        # ours: the lock, and the temporary of a run.json whose writer was killed before the rename
        ours = {p.name for p in out.iterdir()
                if p.name == ".lock" or (p.name.startswith(f".{RUN_NAME}.") and p.name.endswith(TMP_SUFFIX))}
        if {p.name for p in out.iterdir()} - ours:
            raise KdpipeError(f"run directory {out} is not empty and holds no kdpipe student run; "
                              "refusing to write into it (use another --out)")
        return None
    try:
        record = RunRecord.model_validate(read_json(record_path))
    except ValidationError as e:
        raise KdpipeError(f"{record_path} is not a kdpipe run record ({e.errors()[0]['msg']}); "
                          "refusing to write into that directory") from None
    fp = s.manifest.fingerprint_sha256
    if record.cache_fingerprint_sha256 != fp:
        raise CacheMismatchError(
            f"run directory {out} trains from another cache (fingerprint {record.cache_fingerprint_sha256[:12]}..., "
            f"--cache {s.cache} has {fp[:12]}...); refusing to resume: use another --out")
    diffs = cachedir.diff_fingerprints(record.identity, s.identity)
    if diffs:
        raise KdpipeError(f"run directory {out} was started with other settings "
                          f"({'; '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}); "
                          "rerun with the same settings to resume, or use another --out")
    return record


def _load_teacher_checked(s: Setup) -> dict[str, torch.Tensor]:
    """The teacher's weights, refused unless they are the ones the cache was made from."""
    from kdpipe.pipeline.teacher import load_teacher, resolve_model_path, weights_sha256

    if s.teacher_path is None:
        raise KdpipeError("--init teacher needs the teacher's weights: pass --teacher PATH (the cache "
                          "records no teacher path that exists here), or use --init random")
    path = resolve_model_path(s.teacher_path)
    want = s.manifest.fingerprint["teacher"]["weights_sha256"]
    # mode none: the head may not exist yet, and a missing head is initialised at random; seeded, so
    # a rerun (or a run killed before its first checkpoint) copies the same head into the student
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.cfg.seed)
        model = load_teacher(path, allow_missing_head=want is None)
    got = weights_sha256(model)
    if want is not None and got != want:
        raise CacheMismatchError(f"teacher {path} is not the teacher this cache was made from (weights "
                                 f"SHA-256 {got[:12]}..., the cache's fingerprint says {want[:12]}...); refusing")
    return model.state_dict()


def _tokenizer(s: Setup) -> Any | None:
    """The tokenizer saved in the cache (hash-checked), else the teacher's when its path is known."""
    from kdpipe.pipeline.teacher import load_tokenizer, resolve_model_path, tokenizer_sha256

    if s.manifest.tokenizer:
        folder = {_checked(s.cache, e).parent for e in s.manifest.tokenizer}.pop()
        return load_tokenizer(str(folder))
    if s.teacher_path is None:
        return None

    try:
        path = resolve_model_path(s.teacher_path)
    except (ImportError, KdpipeError):
        return None
    if not Path(path).exists():
        return None
    tok = load_tokenizer(path)
    want = s.manifest.fingerprint.get("tokenizer", {}).get("sha256")
    if want and tokenizer_sha256(tok) != want:
        raise CacheMismatchError(f"the tokenizer of {path} is not the one this cache was made with; refusing")
    return tok


# ------------------------------------------------------------------------------------------- run

def _tensorboard_problem(cfg: StudentConfig) -> list[str]:
    import importlib.util

    if cfg.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        return ["--report-to tensorboard needs the tensorboard package: pip install 'kdpipe[tensorboard]'"]
    return []


def _tensorboard(cfg: StudentConfig, out: Path) -> Any | None:
    """A SummaryWriter into RUN_DIR/tensorboard with --report-to tensorboard, else None."""
    if cfg.report_to != "tensorboard":
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out / TENSORBOARD_DIR))


def _trainer(s: Setup, teacher_state: dict[str, torch.Tensor] | None) -> Trainer:
    return build_trainer(s.student_config, int(s.teacher_config["hidden_size"]), s.projection, s.optim,
                         s.cfg.seed, s.cfg.init, s.layer_map, teacher_state, s.device,
                         Path(s.cfg.init_from) if s.cfg.init_from else None, s.layer_projections,
                         s.cfg.precision, s.cfg.compile_spec(), s.relation)


def open_stream(s: Setup, position: Position, w: distributed.World | None = None) -> Iterator[Batch]:
    """The batches from `position` on (this rank's share of each); the first is decoded now, so a
    corrupt first window of the cache is refused before anything in the run directory changes."""
    w = w or distributed.World()
    stream = iter_batches(s.cache, s.manifest, s.loader, position, epochs=s.cfg.epochs, part=(w.rank, w.size),
                          workers=s.cfg.loader_workers, pin_memory=s.device.type == "cuda")
    first = next(stream, None)
    if first is None:
        raise KdpipeError(f"the cache has no rows left to train on from position {position}")
    return itertools.chain([first], stream)


def run(s: Setup, record: RunRecord, tr: Trainer, start: ckpt.TrainState | None,
        stream: Iterator[Batch], w: distributed.World | None = None, tokenizer: Any | None = None
        ) -> dict[str, Any]:
    """Updates from the start (or checkpoint) to total_steps: log, checkpoint, repeat; the last
    step is always checkpointed (a later, longer rerun continues from it). With several ranks
    every rank trains; rank 0 alone writes metrics, samples and checkpoints."""
    w = w or distributed.World()
    cfg, out = s.cfg, s.out
    spec = loss_spec(s)
    step, position = 0, Position(epoch=0, index=0)
    window = {k: 0.0 for k in WINDOW_KEYS}
    if start is not None:
        step, position, window = start.step, start.position, {**window, **start.log_window}
    writer = w.is_main
    if writer:
        truncate_jsonl(out / METRICS_NAME, step)  # a resumed run's files equal an uninterrupted one's
        truncate_jsonl(out / SAMPLES_NAME, step)
    total, warm = s.total_steps, warmup_steps(s.total_steps, cfg.warmup)
    prefetch = Prefetcher(stream, cfg.prefetch) if cfg.prefetch > 0 else None
    batches = iter(prefetch) if prefetch else stream
    tb = _tensorboard(cfg, out) if writer else None
    bar = tqdm(total=total, initial=step, desc="student-train", unit=" step", mininterval=1.0,
               dynamic_ncols=True, disable=not writer)
    t_log, waited, timed_steps, timed_tokens = time.perf_counter(), 0.0, 0, 0  # timings: this process only
    epoch_progress = float(position.epoch)
    with disk_errors(out / METRICS_NAME):
        metrics = open(out / METRICS_NAME, "a", encoding="utf-8") if writer else None
    with disk_errors(out / SAMPLES_NAME):
        samples = open(out / SAMPLES_NAME, "a", encoding="utf-8") if cfg.record_samples and writer else None
    try:
        while step < total:
            lr = lr_at(step, cfg.lr, total, warm)
            try:
                if w.distributed:
                    res = train_step_ddp(tr, batches, s.optim, lr, s.device, samples is not None, w, cfg.seed, step)
                else:
                    res = train_step(tr, batches, spec, s.teacher_head, s.optim, lr, s.device, samples is not None)
            except NonFiniteError as e:
                raise KdpipeError(_stopped(out, step + 1, e)) from None
            waited += res.waited
            if res.batches == 0:
                break  # the epochs are over
            step += 1
            window["steps"] += 1
            for key, v in res.sums.items():
                window[key] += v
            timed_steps, timed_tokens = timed_steps + 1, timed_tokens + res.tokens
            position = res.last.position
            epoch_progress = res.last.epoch_progress
            bar.update(1)
            if samples:
                with disk_errors(out / SAMPLES_NAME):
                    samples.write(json.dumps({"step": step, "rows": res.rows}) + "\n")
                    samples.flush()
            if writer and (step % cfg.log_every == 0 or step == total):
                now = time.perf_counter()
                line = metrics_line(step, window, lr, now - t_log, waited, timed_steps, timed_tokens,
                                     epoch_progress, spec, tr.scaler.get_scale() if tr.scaler else None)
                with disk_errors(out / METRICS_NAME):
                    metrics.write(json.dumps(line) + "\n")
                    metrics.flush()
                bar.set_postfix(loss=f"{line['loss']:.3f}")
                if tb is not None:
                    for k, v in line.items():
                        if k != "step" and v is not None:
                            tb.add_scalar(f"train/{k}", v, step)
                t_log, waited, timed_steps, timed_tokens = now, 0.0, 0, 0
                window = {k: 0.0 for k in WINDOW_KEYS}
            if writer and (step % cfg.save_every == 0 or step == total):
                ckpt.save_checkpoint(out, record.run_id, s.manifest.fingerprint_sha256, s.identity_sha,
                                     ckpt.TrainState(step, position, dict(window)), tr.student,
                                     tr.hidden_map, tr.optimizer, cfg.keep_checkpoints, tokenizer, tr.scaler)
    finally:
        bar.close()
        if metrics:
            _close(metrics)
        if samples:
            _close(samples)
        if prefetch:
            prefetch.close()
        if tb is not None:
            tb.close()
    return {"steps": step, "epoch": round(epoch_progress, 4)}


def _stopped(out: Path, step: int, e: NonFiniteError) -> str:
    """The one line a run stopped by a non-finite loss or gradient ends with: the step, the term,
    what is kept, and where to look. A rerun resumes from that checkpoint and meets the same batch
    again, so it stops again in the same words rather than training on."""
    latest = ckpt.latest_checkpoint(out)
    kept = f"the last good checkpoint {latest.name} is kept" if latest else "no checkpoint was written yet"
    terms = {k: v for k, v in e.terms.items() if k != "loss"}
    bad = {k for k, v in terms.items() if not math.isfinite(v)}
    if bad and bad <= {"ce", "cos", "layer_cos", "relation"} and bad != set(terms):  # the student's own MLM loss is fine
        advice = (f"the cache's {' and '.join(sorted(bad))} targets of this batch are suspect: run "
                  "`kdpipe cache verify --deep`")
    elif "fp16 loss scale" in e.what:
        advice = "the gradients overflow float16: train with --precision bf16 or fp32, or lower --lr"
    else:
        advice = "the student diverged: lower --lr or clip with --max-grad-norm"
    return f"step {step}: {e}; training stopped before this update: no final/ written, {kept}; {advice}"


def _close(f: Any) -> None:
    """Close a log that is flushed after every line: an error here only repeats a failed flush,
    which has raised already (and a torn last line is dropped on resume)."""
    try:
        f.close()
    except OSError:
        pass


# ---------------------------------------------------------------------------------------- finish

def finish(s: Setup, record: RunRecord, tr: Trainer, tokenizer: Any | None, result: dict[str, Any]) -> Path:
    """RUN_DIR/final: a save_pretrained student (+ tokenizer, model card), published by one rename."""
    final = s.out / FINAL_DIR
    if (bad := ckpt.first_nonfinite(tr.student, tr.hidden_map)) is not None:  # never published
        raise KdpipeError(f"the trained student's {bad} holds non-finite values; {final} is not written")
    old = s.out / f".final.old-{os.getpid()}"
    with atomic_dir(final, s.out / f".final.tmp-{os.getpid()}") as tmp:
        stu.save_pretrained(tr.student, tmp, tokenizer)
        atomic_write_bytes(tmp / model_card.CARD_NAME, model_card.render(
            architecture=type(tr.student).__name__, config=json.loads(tr.student.config.to_json_string()),
            parameters=sum(p.numel() for p in tr.student.parameters()), teacher=s.teacher_path,
            fingerprint=s.manifest.fingerprint, fingerprint_sha256=s.manifest.fingerprint_sha256,
            cache=record.cache, run=record.model_dump(mode="json"), steps=result["steps"],
            epoch=result["epoch"]).encode())
        save_file({k: v.detach().cpu().contiguous() for k, v in tr.hidden_map.state_dict().items()},
                  str(tmp / FINAL_HIDDEN_MAP_NAME))
        atomic_write_json(tmp / STUDENT_RECORD_NAME, {
            "run_id": record.run_id, "cache_fingerprint_sha256": record.cache_fingerprint_sha256,
            "steps": result["steps"], "epoch": result["epoch"], "init": record.init,
            "tokenizer": "copied from the teacher" if tokenizer is not None else "none (no teacher path known)",
        })
        if final.exists():  # an extended run's earlier final/: moved aside, dropped once the new one is in
            os.replace(final, old)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _summary(s: Setup, status: str, **extra: Any) -> dict[str, Any]:
    return {"run": str(s.out), "status": status, "total_steps": s.total_steps,
            "cache_fingerprint_sha256": s.manifest.fingerprint_sha256, "version": __version__, **extra}


def main(cfg: StudentConfig, online: Callable[[Batch], Batch] | None = None) -> dict[str, Any] | None:
    """The whole stage; returns a summary for the CLI to print (None on ranks other than 0). Every
    check runs before the run directory is written to: a refused run leaves it as it was. `online`
    replaces each batch's teacher targets before the step: bench/quality.py's baseline of online
    distillation (the teacher run at every step), trained on exactly the batches of a cache. A
    --cache or --out URL is read or staged and published by `storage.staged`, which calls this
    again with local folders (one process only).

    Under torchrun rank 0 claims the run directory (its lock, run.json, the checkpoint to resume
    from) and tells the others; every rank then trains its share of each global batch (DDP)."""
    w = distributed.world()
    if storage.is_url(cfg.cache) or storage.is_url(cfg.out):
        distributed.agree(w, lambda: distributed.refuse_url(w, "--cache/--out", f"{cfg.cache} {cfg.out}"))
        return storage.staged(cfg, lambda c: main(c, online), reads=("cache",), writes={"out": "run"})
    s = distributed.agree(w, lambda: set_up(cfg))
    configure(cfg.precision, cfg.tf32)
    with ExitStack() as held:
        claimed = distributed.agree(w, lambda: _claim(s, held, online) if w.is_main else None)
        shared = distributed.broadcast(w, claimed.shared() if w.is_main else None)
        if "summary" in shared:
            return shared["summary"] if w.is_main else None
        if w.distributed:
            claimed = distributed.agree(w, lambda: claimed if w.is_main else _follow(s, shared, w, online))
        tr, record = claimed.trainer, claimed.record
        if w.distributed:
            wrap_ddp(tr, loss_spec(s), s.teacher_head, w)
        result = run(s, record, tr, claimed.start, claimed.stream, w, claimed.tokenizer)
        final = distributed.agree(w, lambda: finish(s, record, tr, claimed.tokenizer, result)
                                  if w.is_main else None)
    if not w.is_main:
        return None
    status = "extended" if claimed.extended else "resumed" if claimed.resume_from else "trained"
    return _summary(s, status, final=str(final), **result)


@dataclass
class Claimed:
    """What rank 0 (or a world of one) found and set up in the run directory, ready to train."""

    record: RunRecord | None = None
    resume_from: Path | None = None
    stream: Iterator[Batch] | None = None
    trainer: Trainer | None = None
    start: ckpt.TrainState | None = None
    tokenizer: Any | None = None
    summary: dict[str, Any] | None = None  # the run was already complete
    extended: bool = False  # its length changed on this rerun

    def shared(self) -> dict[str, Any]:
        """What the other ranks need from rank 0 (plain data, broadcast)."""
        if self.summary is not None:
            return {"summary": self.summary}
        return {"record": self.record.model_dump(mode="json"),
                "resume_from": None if self.resume_from is None else str(self.resume_from)}


def _final_steps(s: Setup) -> int | None:
    """The steps RUN_DIR/final was trained for (its student record), None if unreadable."""
    try:
        steps = read_json(s.out / FINAL_DIR / STUDENT_RECORD_NAME).get("steps")
    except (OSError, KdpipeError, AttributeError):
        return None
    return steps if isinstance(steps, int) else None


def _check_length(s: Setup, meta: ckpt.CheckpointMeta | None) -> None:
    """A rerun may change the run's length, but not to fewer steps than it has done, and a
    finished run continues only from a checkpoint at its last step."""
    done = meta.step if meta else 0
    final = _final_steps(s) if (s.out / FINAL_DIR).is_dir() else None
    if final is not None and final > s.total_steps or done > s.total_steps:
        raise KdpipeError(f"run directory {s.out} has trained {max(done, final or 0)} steps; a length of "
                          f"{s.total_steps} steps would undo some: give more (or the same) steps")
    if final is not None and done != final:
        raise KdpipeError(f"run directory {s.out} finished at step {final} but its latest checkpoint is at "
                          f"step {done}: it cannot be extended (a run from an older kdpipe?)")


def _record_length(s: Setup, record: RunRecord, meta: ckpt.CheckpointMeta | None) -> bool:
    """run.json's total_steps follows the run's length; each change is kept in length_changes."""
    if record.total_steps == s.total_steps:
        return False
    change = {"at_step": meta.step if meta else 0, "from_total_steps": record.total_steps,
              "to_total_steps": s.total_steps, "config": {k: getattr(s.cfg, k) for k in LENGTH},
              "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    updated = record.model_copy(update={"total_steps": s.total_steps,
                                        "length_changes": [*record.length_changes, change]})
    atomic_write_json(s.out / RUN_NAME, updated.model_dump(mode="json"))
    return True


def _stream_from(s: Setup, meta: ckpt.CheckpointMeta | None, w: distributed.World) -> Iterator[Batch]:
    """The batches after a checkpoint (none when it is at the last step: only finish is left)."""
    if meta is not None and meta.step >= s.total_steps:
        return iter(())
    return open_stream(s, meta.position if meta else Position(epoch=0, index=0), w)


def _claim(s: Setup, held: ExitStack, online: Callable[[Batch], Batch] | None = None) -> Claimed:
    """Rank 0: check the run directory, take its lock (held until `held` closes), find the
    checkpoint to resume from, build the trainer and write run.json for a new run."""
    cfg = s.cfg
    record = check_run_dir(s)
    if record is not None and (s.out / FINAL_DIR).is_dir() and _final_steps(s) == s.total_steps:
        return Claimed(summary=_summary(s, "already complete", final=str(s.out / FINAL_DIR)))
    tokenizer = _tokenizer(s)
    fresh = record is None or ckpt.latest_checkpoint(s.out) is None
    teacher_state = _load_teacher_checked(s) if fresh and cfg.init == "teacher" else None
    ensure_dir(s.out, "run directory")
    held.enter_context(exclusive_lock(s.out, "run"))
    record = check_run_dir(s)  # again, now that no other process can change it
    resume_from = ckpt.latest_checkpoint(s.out) if record is not None else None
    meta = None
    if resume_from is not None:
        meta = ckpt.read_meta(resume_from, record.run_id, s.manifest.fingerprint_sha256, s.identity_sha)
    elif cfg.init == "teacher" and teacher_state is None:  # another process changed the run meanwhile
        teacher_state = _load_teacher_checked(s)
    if record is not None:
        _check_length(s, meta)
    stream = _stream_from(s, meta, distributed.world())
    if online is not None:
        stream = map(online, stream)
    tr = _trainer(s, teacher_state if meta is None else None)
    del teacher_state
    start = ckpt.load_checkpoint(resume_from, meta, tr.student, tr.hidden_map, tr.optimizer,
                                 s.device, tr.scaler) if meta else None
    for p in [*s.out.glob(".final.tmp-*"), *s.out.glob(".final.old-*")]:
        shutil.rmtree(p, ignore_errors=True)
    ckpt.remove_stale_tmp(s.out)
    remove_stale_tmp(s.out)  # a run.json temporary whose writer was killed before the rename
    if record is None:
        record = RunRecord(
            run_id=uuid.uuid4().hex, cache=storage.display(s.cache),
            cache_fingerprint_sha256=s.manifest.fingerprint_sha256,
            config=s.cfg.model_dump(mode="json") | {"layer_map": s.layer_map},
            identity=s.identity, student_config=s.identity["student_config"], init=tr.init_report,
            total_steps=s.total_steps, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            versions=package_versions(), code_revision=code_revision(),
        )
        atomic_write_json(s.out / RUN_NAME, record.model_dump(mode="json"))
        extended = False
    else:
        extended = _record_length(s, record, meta)
        record = RunRecord.model_validate(read_json(s.out / RUN_NAME))
    return Claimed(record, resume_from, stream, tr, start, tokenizer, extended=extended)


def _follow(s: Setup, shared: dict[str, Any], w: distributed.World,
            online: Callable[[Batch], Batch] | None = None) -> Claimed:
    """A rank other than 0: the run rank 0 claimed, from the same checkpoint. A new run starts
    from whatever weights: DDP copies rank 0's (teacher-initialised) ones when it wraps them."""
    record = RunRecord.model_validate(shared["record"])
    resume_from = None if shared["resume_from"] is None else Path(shared["resume_from"])
    meta = None
    if resume_from is not None:
        if not resume_from.is_dir():
            raise KdpipeError(f"rank {w.rank} does not see the checkpoint {resume_from}: the run "
                              "directory must be on a file system every rank shares")
        meta = ckpt.read_meta(resume_from, record.run_id, s.manifest.fingerprint_sha256, s.identity_sha)
    stream = _stream_from(s, meta, w)
    if online is not None:
        stream = map(online, stream)
    tr = _trainer(s, None)
    start = ckpt.load_checkpoint(resume_from, meta, tr.student, tr.hidden_map, tr.optimizer,
                                 s.device, tr.scaler) if meta else None
    return Claimed(record, resume_from, stream, tr, start)


@click.command("student-train", epilog="Example: kdpipe student-train --cache caches/wiki --out runs/s3 "
               "--teacher ./bert-mlm --max-steps 2000 --save-every 200. Rerun the same command to resume. "
               "On a GPU: add --precision bf16 (or fp16) --torch-compile.")
@config_option
@click.option("--cache", help="Teacher cache directory (made by teacher-dump), or its URL (s3://...).")
@click.option("--out", help="Run directory to create or resume, or a URL (s3://bucket/path, ...).")
@click.option("--teacher", help="Teacher folder, read only to initialise the student and copy its "
              "tokenizer; its weights must match the cache. [the path recorded in the cache]")
@click.option("--init", type=click.Choice(["teacher", "random", "pretrained"]),
              help="Student initialisation: teacher layers, random, or a model folder (--init-from). [teacher]")
@click.option("--init-from", help="Start the student from this save_pretrained folder (a run's final/ or "
              "any checkpoints/step-N/, or another masked LM with the cache's vocabulary); its config "
              "is the student's architecture.")
@click.option("--layer-map", callback=ints_option, help="Teacher layer copied into each student layer, e.g. "
              "0,2,4. [every other layer]")
@click.option("--student-arch", type=click.Choice(["teacher", "distilbert"]),
              help="Student architecture: the teacher's own, or DistilBertForMaskedLM (from a BERT "
              "teacher: token-type embeddings folded into the positions, layers copied by --layer-map). "
              "[teacher]")
@click.option("--student-config", help="JSON config of the student architecture (transformers format; "
              "model_type distilbert for a DistilBERT). [the teacher's]")
@click.option("--student-layers", type=int, help="Student layers. [half the teacher's]")
@click.option("--student-hidden", type=int, help="Student hidden width. [the teacher's]")
@click.option("--student-heads", type=int, help="Student attention heads. [the teacher's]")
@click.option("--student-intermediate", type=int, help="Student feed-forward width. [scaled with the width]")
@click.option("--alpha-ce", type=float, help=f"Weight of the distillation KL. [{REFERENCE_ALPHA_CE}]")
@click.option("--alpha-mlm", type=float, help=f"Weight of the masked-LM loss. [{REFERENCE_ALPHA_MLM}]")
@click.option("--alpha-cos", type=float,
              help=f"Weight of the hidden-state cosine loss. [{REFERENCE_ALPHA_COS}]")
@click.option("--alpha-layer-cos", type=float, help="Weight of the layer-wise hidden-state cosine loss: "
              "student layers 1..M-1 against the teacher layers the cache holds (teacher-dump --hidden-layers), "
              "matched through the layer map (pipeline/layer_targets.py). "
              f"[{DEFAULT_ALPHA_LAYER_COS:g}: off]")
@click.option("--alpha-relation", type=float, help="Weight of the MiniLM-style relation KL: the Q-Q, K-K, "
              "V-V relations (those the cache holds: teacher-dump --relation-layer, --relation-parts) of the "
              "student's matched layer against the teacher's (pipeline/relation_targets.py). "
              f"[{DEFAULT_ALPHA_RELATION:g}: off]")
@click.option("--relation-heads", type=int, help="Relation heads of --alpha-relation (MiniLMv2's; they need "
              "not be the attention heads, but must divide both the teacher's and the student's width). "
              "[the teacher's attention heads]")
@click.option("--temperature", type=float, help="Softening temperature; must be in the cache's grid. "
              f"[{REFERENCE_TEMPERATURE}]")
@click.option("--ce-masked-only", is_flag=True, default=None, help="Distil only at masked positions "
              "(the reference's restrict_ce_to_mask). [every non-padding token]")
@click.option("--max-steps", type=int, help="Optimizer updates to run (instead of --epochs); may be raised "
              "on a rerun to extend a run, finished or not (the schedule follows the new length).")
@click.option("--epochs", type=int, help="Passes over the cache. [3] May be raised on a rerun, as --max-steps.")
@click.option("--seed", type=int, help="Seed of the student init, dropout and data order. [0]")
@click.option("--batch-size", type=int, help="Sequences per batch. [32]")
@click.option("--batch-tokens", type=int, help="Padded tokens per batch, instead of --batch-size.")
@click.option("--grad-accum", type=int, help="Batches per optimizer update. [1]")
@click.option("--lr", type=float, help="Peak learning rate. [5e-4]")
@click.option("--warmup", type=float, help="Share of the updates spent warming up. [0.05]")
@click.option("--weight-decay", type=float, help="AdamW weight decay. [0]")
@click.option("--adam-betas", callback=floats_option, help="AdamW betas. [0.9,0.98]")
@click.option("--adam-eps", type=float, help="AdamW epsilon. [1e-6]")
@click.option("--max-grad-norm", type=float, help="Gradient clipping norm; 0 turns it off. [5.0]")
@click.option("--shuffle-window", type=int, help="Shards whose rows are shuffled together. [4]")
@click.option("--save-every", type=int, help="Updates between checkpoints. [500]")
@click.option("--keep-checkpoints", type=int, help="Checkpoints kept. [3]")
@click.option("--log-every", type=int, help="Updates between metrics lines. [10]")
@click.option("--prefetch", type=int, help="Batches decoded ahead in a background thread. [4]")
@click.option("--loader-workers", type=int, help="Worker processes reading and decoding shards (threads "
              "where /dev/shm cannot hold their slots); 1: all in the training process. The batches are the "
              "same whatever the number. [cores - 1, 1 to 4]")
@click.option("--device", help="auto, cpu, cuda, cuda:N. [auto]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), help="Autocast of the "
              "student's forward pass (the losses are float32); fp16 scales the loss (GradScaler), skipping "
              "the updates whose gradients overflow. [auto: bf16 on CUDA, fp32 on CPU]")
@click.option("--tf32/--no-tf32", default=None, help="Let CUDA use TF32 for float32 matmuls. [off]")
@compile_options("the student's encoder and MLM head (checkpoints keep the model's own tensor names)")
@click.option("--report-to", type=click.Choice(["none", "tensorboard"]), help="Also log the metrics to "
              "TensorBoard (RUN_DIR/tensorboard; pip install 'kdpipe[tensorboard]'). metrics.jsonl is "
              "always written. [none]")
@click.option("--record-samples", is_flag=True, default=None,
              help="Write the (seq_id, view) rows of every update to samples.jsonl.")
def command(config_file: Path | None, **flags: Any) -> None:
    """Train a student from a teacher cache (the teacher is never run)."""
    cfg = build_config(StudentConfig, config_file, flags)
    with distributed.joined(cfg.device):
        summary = main(cfg)
    if summary is not None:
        echo_json(summary)
