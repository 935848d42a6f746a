"""An eval report directory's bookkeeping: eval.json (the settings), parts/ (the finished units
of work) and splits/ (each task's train/dev indices); report.json and report.md are `finish`'s.

eval.json is written first and holds what every result depends on; a rerun with other settings
is refused, naming what differs. Each part is written atomically once its unit is done and
carries the hash of those settings, so a rerun (after `kill -9` too) skips it; a missing,
damaged or foreign part is simply redone.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from kdpipe.pipeline import downstream
from kdpipe.pipeline.corpus import Corpus
from kdpipe.pipeline.errors import KdpipeError
from kdpipe.pipeline.fsutil import atomic_write_json, ensure_dir, read_json, remove_stale_tmp
from kdpipe.pipeline.models import Model
from kdpipe.schemas.report import PARTS_DIR, SETTINGS_NAME, SPLITS_DIR, EvalSettings, Part

# the configuration keys each section's results depend on (`--seeds` is not one: see settings)
SECTION_KEYS = {
    "mlm": ("heldout_text_column", "heldout_sequences", "seq_len", "packing", "mask_prob",
            "mask_token_prob", "random_token_prob", "mask_seed", "eval_batch_size"),
    "downstream": ("text_column", "label_column", "task_split", "split_seed", "dev_fraction",
                   "max_train_examples", "max_dev_examples", "lr", "epochs", "batch_size",
                   "max_length", "weight_decay", "warmup_ratio", "eval_batch_size"),
    "speed": ("speed_batch_size", "speed_seq_len", "speed_repeats", "speed_warmup"),
    "sweep": ("sweep_lr", "sweep_epochs", "tune_fraction", "sweep_seeds"),
}
LATER_KEYS = {"group_by_length": False}  # downstream settings and their value when not in use


# ----------------------------------------------------------------------------------- eval.json

def settings(config: dict[str, Any], device: torch.device, models: list[Model],
             tasks: list[downstream.Task], heldout: Corpus | None, speed: bool,
             recorded: dict[str, Any] | None = None, distilled: list[str] | None = None) -> dict[str, Any]:
    """What every part's result depends on; eval.json holds it and a rerun must match it.

    Only the settings of the sections asked for are included, and `--seeds` is not: each seed is
    its own part, so more seeds later reuse the ones done. Models and inputs are identified by
    content (weights and file hashes), so a moved run directory is still the same student."""
    asked = {"mlm": heldout is not None, "downstream": bool(tasks), "speed": speed,
             "sweep": bool(tasks) and bool(config["sweep_lr"] or config["sweep_epochs"])}
    out: dict[str, Any] = {"device": str(device)}
    if config.get("precision", "auto") != "auto":  # recorded only when chosen: older reports still match
        out["precision"] = config["precision"]
    if config.get("tf32"):
        out["tf32"] = True
    out.update(recorded or {})  # torch_compile, when asked: it may change float results
    out.update({section: {k: config[k] for k in keys}
                for section, keys in SECTION_KEYS.items() if asked[section]})
    if asked["downstream"]:  # settings added later: present only when used, so older reports resume
        out["downstream"].update({k: config[k] for k, off in LATER_KEYS.items() if config[k] != off})
        if distilled:  # the students fine-tuned against the teacher too, and how
            out["downstream"]["task_distill"] = {"students": distilled, "alpha": config["task_distill_alpha"],
                                                 "temperature": config["task_distill_temperature"],
                                                 "transfer": config["task_distill_transfer"],
                                                 **({"augment": True} if config["task_distill_augment"] else {})}
    inputs = {
        "models": {m.name: {"role": m.role, "weights_sha256": m.entry["weights_sha256"],
                            "tokenizer_sha256": m.tokenizer_sha} for m in models},
        "tasks": {t.name: t.fingerprint for t in tasks},
        "heldout": heldout.fingerprint if heldout is not None else None,
    }
    return EvalSettings(settings=out, inputs=inputs).model_dump(mode="json")


_ABSENT = object()


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


def guard_settings(out: Path, settings: dict[str, Any]) -> bool:
    """Write eval.json, or check it against `settings`; True when resuming a directory."""
    path = out / SETTINGS_NAME
    if not path.exists():
        if any(p.name not in {".lock"} for p in out.iterdir()):
            raise KdpipeError(f"{out} is not empty and holds no kdpipe eval (no {SETTINGS_NAME}); "
                              "refusing to write into it")
        atomic_write_json(path, settings)
        return False
    old = read_json(path)
    if old != settings:
        diffs = settings_difference(old, settings)
        more = f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
        raise KdpipeError(f"{out} holds an eval made with other settings ({'; '.join(diffs[:6])}{more}); "
                          "use another --out, or delete that directory to start over")
    return True


# -------------------------------------------------------------------------------------- parts

def task_key(task: str, model: str, seed: int) -> str:
    return f"task/{task}/{model}/seed{seed}"


def sweep_key(task: str, model: str, lr: float, seed: int) -> str:
    """One learning rate of a model's sweep on a task (every epoch count of the grid is in it)."""
    return f"sweep/{task}/{model}/lr{lr:g}/seed{seed}"


def augment_key(task: str) -> str:
    """A task's augmented copies of its training examples (pipeline/augment.py), made once."""
    return f"augment/{task}"


def soft_key(task: str, seed: int) -> str:
    """The teacher fine-tuned on a sweep's fit examples alone (its chosen recipe, sweep seed k):
    its logits on them are the soft labels of the distilled students' sweep."""
    return f"soft/{task}/seed{seed}"


@dataclass(frozen=True)
class Parts:
    """parts/speed.json, parts/mlm/<model>.json, parts/task/<task>/<model>/seed<k>.json,
    parts/sweep/<task>/<model>/lr<lr>/seed<k>.json, parts/soft/<task>/seed<k>.json, parts/augment/<task>.json."""

    out: Path  # the report directory
    settings_sha: str  # of eval.json's content

    def remove_stale_tmp(self) -> None:
        """Temporary files a killed writer left in the report directory or under parts/."""
        parts = self.out / PARTS_DIR
        for d in (self.out, parts, *(p for p in parts.rglob("*") if p.is_dir())):
            remove_stale_tmp(d)

    def path(self, key: str) -> Path:
        return self.out / PARTS_DIR / f"{key}.json"

    def read(self, key: str) -> dict[str, Any] | None:
        """A finished unit's data, or None when it is missing or unusable (then it is redone)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            part = Part.model_validate(read_json(path))
        except (KdpipeError, ValidationError):
            return None
        if part.key != key or part.settings_sha256 != self.settings_sha:
            return None
        return part.data

    def done(self, key: str) -> dict[str, Any]:
        """The data of a part the run wrote; only a concurrent deletion makes it missing."""
        data = self.read(key)
        if data is None:
            raise KdpipeError(f"part {self.path(key)} is missing; rerun the same command")
        return data

    def write(self, kind: str, key: str, data: dict[str, Any]) -> None:
        path = self.path(key)
        ensure_dir(path.parent, "report directory")
        part = Part(kind=kind, key=key, settings_sha256=self.settings_sha, data=data)
        atomic_write_json(path, part.model_dump(mode="json"))


# ------------------------------------------------------------------------------------- splits

def split_file(task: str) -> str:
    """splits/<task>.json, relative to the report directory."""
    return f"{SPLITS_DIR}/{task}.json"


def write_splits(out: Path, tasks: list[downstream.Task], splits: dict[str, downstream.Split],
                 tunes: dict[str, list[int]]) -> None:
    """Each task's indices; `tune` (a sweep's tuning split, part of `train`) and `transfer` (the
    task-distilled students' unlabelled examples) when there are."""
    ensure_dir(out / SPLITS_DIR, "report directory")
    for t in tasks:
        sp = splits[t.name]
        extra = {"tune": tunes[t.name]} if t.name in tunes else {}
        if sp.transfer:
            extra["transfer"] = sp.transfer
        atomic_write_json(out / split_file(t.name), {
            "task": t.name, "spec": t.spec, "method": downstream.SPLIT_METHOD, "seed": sp.seed,
            "dev_fraction": sp.dev_fraction, "examples": len(t.texts), "train": sp.train, "dev": sp.dev,
            **extra})
