"""Student checkpoints: everything needed to continue a run exactly, written atomically.

Each checkpoint is also a plain `save_pretrained` folder (config.json, model.safetensors and the
tokenizer where one is known), so any step loads with `AutoModelForMaskedLM.from_pretrained`, can
be evaluated, fine-tuned, or used by `student-train --init-from`.

A checkpoint is a directory assembled under a temporary name and renamed into place when every
file (and checkpoint.json, with their hashes, last) is written; then `checkpoints/latest` is
replaced atomically with its name. A kill at any point leaves the previous checkpoint as the
latest complete one. Only checkpoints of this run (same run_id) are ever pruned.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file
from torch import nn

from kdpipe.pipeline import student as stu
from kdpipe.pipeline.errors import CacheMismatchError, KdpipeError, tensor_file_errors, validate_record
from kdpipe.pipeline.fsutil import atomic_dir, atomic_write_bytes, dumps_json, read_json, sha256_file
from kdpipe.schemas.checkpoint import (
    CHECKPOINT_META, CHECKPOINT_PATTERN, CHECKPOINT_VERSION, CHECKPOINTS_DIR, HIDDEN_MAP_FILE, LATEST_NAME,
    OPTIMIZER_FILE, RNG_FILE, STUDENT_FILE, CheckpointMeta, Position, checkpoint_name,
)

_TMP_PREFIX = ".tmp-"


# ------------------------------------------------------------------------------------------ RNG

def rng_state() -> tuple[list[Any], list[Any], dict[str, torch.Tensor]]:
    """Python and numpy states as JSON, torch CPU (and every CUDA device's) as uint8 tensors."""
    version, state, gauss = random.getstate()
    py = [version, list(state), gauss]
    name, keys, pos, has_gauss, cached = np.random.get_state()
    npy = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s.cpu()
    return py, npy, tensors


def set_rng_state(py: list[Any], npy: list[Any], tensors: dict[str, torch.Tensor]) -> None:
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])


# ----------------------------------------------------------------------------------------- save

@dataclass
class TrainState:
    """What a checkpoint restores, besides the modules' and optimizer's own state."""

    step: int
    position: Position
    log_window: dict[str, float]


def save_checkpoint(run_dir: Path, run_id: str, cache_sha: str, identity_sha: str, state: TrainState,
                    student: nn.Module, hidden_map: nn.Module, optimizer: torch.optim.Optimizer,
                    keep: int, tokenizer: Any | None = None, scaler: torch.amp.GradScaler | None = None
                    ) -> Path:
    """Write checkpoint `state.step` atomically, point `latest` at it, prune older ones of this run.
    `student` is the plain module (never a torch.compile wrapper): its state_dict names are the
    model's own."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(state.step)
    final = root / name
    with atomic_dir(final, root / f"{_TMP_PREFIX}{name}.{os.getpid()}") as tmp:
        _write_checkpoint(tmp, final, run_id, cache_sha, identity_sha, state, student, hidden_map, optimizer,
                          tokenizer, scaler)
    atomic_write_bytes(root / LATEST_NAME, (name + "\n").encode())
    prune(run_dir, run_id, keep, protect=name)
    return final


def _write_checkpoint(tmp: Path, final: Path, run_id: str, cache_sha: str, identity_sha: str,
                      state: TrainState, student: nn.Module, hidden_map: nn.Module,
                      optimizer: torch.optim.Optimizer, tokenizer: Any | None,
                      scaler: torch.amp.GradScaler | None = None) -> None:
    """Every file under `tmp`, checkpoint.json last, all synced; `final` cleared for the rename."""
    tmp.mkdir()
    stu.save_pretrained(student, tmp, tokenizer)  # config.json, STUDENT_FILE (+ tokenizer)
    save_file({k: v.detach().cpu().contiguous() for k, v in hidden_map.state_dict().items()},
              str(tmp / HIDDEN_MAP_FILE))
    # into a file object: a failed write then keeps its OSError (errno) as the RuntimeError's context
    with open(tmp / OPTIMIZER_FILE, "wb") as f:
        torch.save(optimizer.state_dict(), f)
    py, npy, tensors = rng_state()
    save_file(tensors, str(tmp / RNG_FILE))
    files = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
    meta = CheckpointMeta(
        run_id=run_id, step=state.step, position=state.position, cache_fingerprint_sha256=cache_sha,
        identity_sha256=identity_sha, python_rng=py, numpy_rng=npy, log_window=state.log_window,
        files=files, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        grad_scaler=None if scaler is None else dict(scaler.state_dict()),
    )
    (tmp / CHECKPOINT_META).write_bytes(dumps_json(meta.model_dump(mode="json")))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # a checkpoint of this run re-reached after a kill: same content
        if not _owned(final, run_id):
            raise KdpipeError(f"{final} exists and was not written by this run; refusing to replace it")
        shutil.rmtree(final)


def _owned(path: Path, run_id: str) -> bool:
    try:
        return read_json(path / CHECKPOINT_META).get("run_id") == run_id
    except (OSError, KdpipeError, AttributeError):
        return False


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / CHECKPOINTS_DIR
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = re.match(CHECKPOINT_PATTERN, p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def prune(run_dir: Path, run_id: str, keep: int, protect: str) -> None:
    """Delete all but the newest `keep` checkpoints that this run wrote."""
    ours = [(s, p) for s, p in list_checkpoints(run_dir) if _owned(p, run_id)]
    for _, p in ours[: max(0, len(ours) - keep)]:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)


def remove_stale_tmp(run_dir: Path) -> None:
    """Temporary checkpoint directories of a killed writer (our own naming only)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if root.is_dir():
        for p in root.glob(f"{_TMP_PREFIX}step-*"):
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------- load

def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or None when the run has none yet."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_NAME
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    if not re.match(CHECKPOINT_PATTERN, name) or not (root / name).is_dir():
        raise KdpipeError(f"{pointer} names {name!r}, which is not a checkpoint of {run_dir}")
    return root / name


def read_meta(path: Path, run_id: str, cache_sha: str, identity_sha: str) -> CheckpointMeta:
    """A checkpoint's metadata, refusing one from another run, cache or config, or damaged."""
    raw = read_json(path / CHECKPOINT_META) if (path / CHECKPOINT_META).is_file() else None
    if not isinstance(raw, dict):
        raise KdpipeError(f"checkpoint {path} has no readable {CHECKPOINT_META}")
    if raw.get("format_version") != CHECKPOINT_VERSION:
        raise KdpipeError(f"checkpoint {path}: format version {raw.get('format_version')} is not "
                          f"supported (this kdpipe reads version {CHECKPOINT_VERSION})")
    meta = validate_record(CheckpointMeta, raw, f"checkpoint {path}")
    if meta.cache_fingerprint_sha256 != cache_sha:
        raise CacheMismatchError(
            f"checkpoint {path} was trained from another cache (fingerprint "
            f"{meta.cache_fingerprint_sha256[:12]}..., this run's is {cache_sha[:12]}...); refusing to resume")
    if meta.run_id != run_id:
        raise KdpipeError(f"checkpoint {path} belongs to another run ({meta.run_id}, this is {run_id}); "
                          "refusing to resume from it")
    if meta.identity_sha256 != identity_sha:
        raise KdpipeError(f"checkpoint {path} was made with other settings; refusing to resume")
    for name, digest in meta.files.items():
        f = path / name
        if not f.is_file() or sha256_file(f) != digest:
            raise KdpipeError(f"checkpoint {path} is damaged: {name} is missing or does not match its hash")
    return meta


def first_nonfinite(*modules: nn.Module) -> str | None:
    """The name of the first floating-point tensor of `modules` holding a NaN or an infinity."""
    for module in modules:
        for name, t in module.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return name
    return None


def load_checkpoint(path: Path, meta: CheckpointMeta, student: nn.Module, hidden_map: nn.Module,
                    optimizer: torch.optim.Optimizer, device: torch.device,
                    scaler: torch.amp.GradScaler | None = None) -> TrainState:
    """Restore the modules, optimizer, loss scaler (fp16) and every RNG from a checked checkpoint."""
    with tensor_file_errors(path / STUDENT_FILE):
        missing, unexpected = load_model(student, str(path / STUDENT_FILE), strict=False, device=str(device))
    if missing or unexpected:
        raise KdpipeError(f"checkpoint {path} does not fit the student ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected tensors)")
    with tensor_file_errors(path / HIDDEN_MAP_FILE):
        hidden_map.load_state_dict(load_file(str(path / HIDDEN_MAP_FILE), device=str(device)))
    with tensor_file_errors(path / OPTIMIZER_FILE):
        optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, map_location=device, weights_only=True))
    if (bad := first_nonfinite(student, hidden_map)) is not None:
        raise KdpipeError(f"checkpoint {path} holds non-finite weights ({bad}); it cannot be resumed from: "
                          "remove it (and point checkpoints/latest at an earlier one) or start a new run")
    with tensor_file_errors(path / RNG_FILE):
        rng = load_file(str(path / RNG_FILE))
    if scaler is not None:
        if meta.grad_scaler is None:
            raise KdpipeError(f"checkpoint {path} holds no fp16 loss-scaler state; it cannot be resumed in fp16")
        scaler.load_state_dict(meta.grad_scaler)
    set_rng_state(meta.python_rng, meta.numpy_rng, rng)
    return TrainState(meta.step, meta.position, dict(meta.log_window))
