"""`kdpipe teacher-adapt`: give an encoder-only checkpoint a trained masked-LM head.

    kdpipe teacher-adapt --teacher builtin:minilm-l6 --data builtin:wikipedia \
        --out teachers/minilm-mlm --max-steps 100 --heldout heldout.txt

A sentence encoder such as all-MiniLM-L6-v2 ships without `cls.predictions.*`: loaded as a masked
LM its logits are random, so it cannot teach. This stage is the other two stages composed, so it
inherits their guarantees (flat memory, exact resume after kill -9, refusal of changed settings):
1. `teacher-dump --targets none` writes a labels-only cache: masked inputs and MLM labels, no
   teacher run (the head it would need does not exist yet);
2. `student-train` trains a "student" that is a full copy of the encoder (every layer, same width)
   with the MLM loss alone;
3. the result is published as a plain model folder, OUT/model, usable as `--teacher` anywhere,
   and the masked-token accuracy on held-out text before and after goes to OUT/adapt.json.

OUT is tied to what made it: OUT/teacher_adapt.json, written before anything else, records the
settings and a hash of the teacher's files, then the cache's fingerprint. A rerun with other
settings or another teacher, or an OUT this stage did not make (a user's model/, say), is refused
in one line; model/ is published only if it is what run/final holds, and adapt.json is reused only
for the same held-out text and model. A matching rerun changes nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import click
import torch
from pydantic import Field

from kdpipe.pipeline.cache import diff_fingerprints, fingerprint_sha256
from kdpipe.pipeline.compiling import CompileSettings, compile_options
from kdpipe.pipeline.config import MAX_SEED, build_config, config_option, echo_json
from kdpipe.pipeline.errors import CacheMismatchError, KdpipeError
from kdpipe.pipeline.fsutil import (
    atomic_dir, atomic_write_json, dumps_json, ensure_dir, exclusive_lock, read_json, remove_stale_tmp,
    sha256_bytes, sha256_file,
)
from kdpipe.pipeline.masking import MaskingSpec
from kdpipe.schemas.checkpoint import FINAL_DIR
from kdpipe.schemas.manifest import FINGERPRINT_NAME, TEACHER_CONFIG_NAME
from kdpipe.stages import student_train, teacher_dump

# Measured on MiniLM-L6-H384 and the built-in Wikipedia text (see ../shared/design.md): lr 2e-4
# with 100 warm-up steps reached 16% masked-token accuracy after 100 steps, 31% after 461.
ADAPT_LR = 2e-4
ADAPT_WARMUP_STEPS = 100
# OUT's layout: the labels-only cache, the training run, the published teacher, the accuracy report
CACHE_DIR, RUN_DIR, MODEL_DIR, ADAPT_NAME = "cache", "run", "model", "adapt.json"
RECORD_NAME = "teacher_adapt.json"  # what OUT was made from; written before anything else in OUT
RECORD_VERSION = 1
# fields that do not change what is made (adapt.json records its held-out text itself)
_NOT_IDENTITY = {"out", "device", "save_every", "heldout", "heldout_sequences"}
# settings added later: left out of the identity at these values (what OUT was made with before
# they existed), so an OUT made then still matches
_LATER = {"precision": "auto", "torch_compile": False, "torch_compile_backend": None, "torch_compile_mode": None}


class AdaptConfig(CompileSettings):
    teacher: str
    data: list[str] = Field(min_length=1)
    out: str
    heldout: list[str] = []
    heldout_sequences: int = Field(64, ge=1)
    text_column: str = "text"
    format: Literal["auto", "text", "json", "parquet", "csv", "tsv", "disk", "repo"] = "auto"
    seq_len: int = Field(128, ge=8, le=65535)
    max_sequences: int | None = Field(None, ge=1)
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(ADAPT_LR, gt=0)
    warmup_steps: int = Field(ADAPT_WARMUP_STEPS, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    save_every: int = Field(50, ge=1)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # of the training, as student-train's


def heldout_accuracy(model: torch.nn.Module, tokenizer: Any, cfg: AdaptConfig) -> float:
    """Masked-token top-1 accuracy (%) on the held-out text, masks drawn as `kdpipe eval` draws them."""
    from kdpipe.pipeline import mlm_eval
    from kdpipe.pipeline.device import pick_device

    h = mlm_eval.Heldout(tuple(cfg.heldout), cfg.text_column, cfg.heldout_sequences, cfg.seq_len,
                         masking=MaskingSpec(seed=cfg.seed), column_flag="--text-column")
    corpus = mlm_eval.resolve_heldout(h)
    batches, _, _ = mlm_eval.heldout_batches(h, corpus, tokenizer, int(model.config.vocab_size))
    device = pick_device(cfg.device)
    model = model.to(device).eval()
    hits = total = 0
    for ids, att, sel, labels in batches:
        z = mlm_eval.masked_logits(model, ids, att, sel, device)  # (N, V)
        hits += int((z.argmax(-1).cpu() == labels).sum())
        total += labels.numel()
    return round(100.0 * hits / max(total, 1), 2)


def tree_sha256(folder: Path) -> str | None:
    """Hash of every file under `folder` (relative names and contents; hidden names skipped), or
    None for a path that is not a folder (a model id resolved by the local Hugging Face cache)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return sha256_bytes(dumps_json({p.relative_to(folder).as_posix(): sha256_file(p) for p in files}))


def _identity(cfg: AdaptConfig, teacher_path: str) -> dict[str, Any]:
    settings = {k: v for k, v in cfg.model_dump().items()
                if k not in _NOT_IDENTITY and not (k in _LATER and v == _LATER[k])}
    return {"settings": settings, "teacher_files_sha256": tree_sha256(Path(teacher_path))}


def _claim(cfg: AdaptConfig, out: Path, teacher_path: str) -> dict[str, Any]:
    """OUT's record, written now if OUT is new; refused (one line) if OUT was made by other settings
    or another teacher, or holds files this stage did not make."""
    want = _identity(cfg, teacher_path)
    path = out / RECORD_NAME
    if not path.is_file():
        strays = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if strays:
            raise KdpipeError(f"output directory {out} holds files teacher-adapt did not make here "
                              f"({', '.join(strays[:3])}{', ...' if len(strays) > 3 else ''}; no {RECORD_NAME}); "
                              "refusing to publish into it: use an empty or new --out")
        record = {"format_version": RECORD_VERSION, **want, "cache_fingerprint_sha256": None}
        atomic_write_json(path, record)
        return record
    record = read_json(path)
    if not isinstance(record, dict) or record.get("format_version") != RECORD_VERSION:
        raise KdpipeError(f"{path} is not a teacher-adapt record this kdpipe reads; use another --out")
    have = {k: record.get(k) for k in want}
    if diffs := diff_fingerprints(have, want):
        raise CacheMismatchError(f"output directory {out} was made by teacher-adapt with other settings or "
                                 f"another teacher ({'; '.join(diffs[:4])}{' ...' if len(diffs) > 4 else ''}); "
                                 "rerun with the same settings, or use another --out")
    return record


def _publish(final: Path, target: Path) -> None:
    """Copy the trained model folder into place atomically (a half-copied teacher never exists)."""
    with atomic_dir(target) as tmp:
        shutil.copytree(final, tmp)


def main(cfg: AdaptConfig) -> dict[str, Any]:
    """The whole stage, under a lock on OUT: the stages inside lock cache/ and run/ themselves, but
    the published model/ and adapt.json (and the removal of stale temporaries) are this one's."""
    from kdpipe.pipeline.teacher import resolve_model_path

    resolve_model_path(cfg.teacher)  # a missing teacher is refused before OUT is created
    out = ensure_dir(Path(cfg.out), "output directory")
    with exclusive_lock(out, "teacher-adapt output"):
        return _adapt(cfg, out)


def _adapt(cfg: AdaptConfig, out: Path) -> dict[str, Any]:
    from kdpipe.pipeline.teacher import load_teacher, load_tokenizer, resolve_model_path

    remove_stale_tmp(out)
    teacher_path = resolve_model_path(cfg.teacher)
    dump = teacher_dump.DumpConfig(
        teacher=cfg.teacher, data=cfg.data, out=str(out / CACHE_DIR), text_column=cfg.text_column,
        format=cfg.format, seq_len=cfg.seq_len, max_sequences=cfg.max_sequences, seed=cfg.seed,
        targets="none", shard_size=256)
    fresh = not (out / RECORD_NAME).is_file()
    record = _claim(cfg, out, teacher_path)
    try:
        dumped = teacher_dump.main(dump)
    except KdpipeError:
        if fresh and not (out / CACHE_DIR).exists():  # refused before it made anything: OUT as it was
            (out / RECORD_NAME).unlink(missing_ok=True)
        raise
    fp_sha = fingerprint_sha256(read_json(out / CACHE_DIR / FINGERPRINT_NAME))
    if record["cache_fingerprint_sha256"] not in (None, fp_sha):  # cache/ removed, then other text
        raise CacheMismatchError(f"{out / CACHE_DIR} now holds a cache of other text or another tokenizer "
                                 f"than the one {out} was made from (fingerprint {fp_sha[:12]}..., "
                                 f"{RECORD_NAME} says {record['cache_fingerprint_sha256'][:12]}...); "
                                 "use another --out")
    if record["cache_fingerprint_sha256"] is None:
        atomic_write_json(out / RECORD_NAME, {**record, "cache_fingerprint_sha256": fp_sha})
    layers = int(read_json(out / CACHE_DIR / TEACHER_CONFIG_NAME)["num_hidden_layers"])
    train = student_train.StudentConfig(
        cache=str(out / CACHE_DIR), out=str(out / RUN_DIR), teacher=cfg.teacher, init="teacher",
        student_layers=layers, layer_map=list(range(layers)), alpha_ce=0.0, alpha_cos=0.0,
        alpha_mlm=1.0, max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr,
        warmup=min(0.99, cfg.warmup_steps / cfg.max_steps), weight_decay=cfg.weight_decay,
        seed=cfg.seed, save_every=cfg.save_every, device=cfg.device, precision=cfg.precision,
        torch_compile=cfg.torch_compile, torch_compile_backend=cfg.torch_compile_backend,
        torch_compile_mode=cfg.torch_compile_mode)
    trained = student_train.main(train)
    model_dir = out / MODEL_DIR
    made = tree_sha256(out / RUN_DIR / FINAL_DIR)
    if not model_dir.exists():
        _publish(out / RUN_DIR / FINAL_DIR, model_dir)
    elif tree_sha256(model_dir) != made:
        raise KdpipeError(f"{model_dir} is not the model this run trained (its files differ from "
                          f"{out / RUN_DIR / FINAL_DIR}); refusing to report it: remove it to publish the "
                          "trained one, or use another --out")
    summary: dict[str, Any] = {"teacher": cfg.teacher, "model": str(model_dir),
                               "steps": trained.get("total_steps"), "cache_tokens": dumped.get("tokens")}
    if cfg.heldout:
        report_path = out / ADAPT_NAME
        done = read_json(report_path) if report_path.is_file() else {}
        scored = {"heldout": list(cfg.heldout), "heldout_sequences": cfg.heldout_sequences, "model_sha256": made}
        if not isinstance(done, dict) or "accuracy_after" not in done or \
                any(done.get(k) != v for k, v in scored.items()):  # other text, or another model
            tokenizer = load_tokenizer(teacher_path)
            torch.manual_seed(cfg.seed)  # the missing head's random init, for a reproducible "before"
            before = heldout_accuracy(load_teacher(teacher_path, allow_missing_head=True), tokenizer, cfg)
            after = heldout_accuracy(load_teacher(str(model_dir)), tokenizer, cfg)
            done = {"accuracy_before": before, "accuracy_after": after, **scored,
                    "metric": "masked-token top-1 %"}
            atomic_write_json(report_path, done)
        summary.update(done)
    return summary


@click.command("teacher-adapt", epilog="Example: kdpipe teacher-adapt --teacher builtin:minilm-l6 "
               "--data builtin:wikipedia --out teachers/minilm-mlm --max-steps 100. On a GPU: add "
               "--precision fp16 --torch-compile.")
@config_option
@click.option("--teacher", help="Encoder checkpoint folder (or builtin:NAME), head trained or not.")
@click.option("--data", multiple=True, help="Text to adapt on (as for teacher-dump); repeatable.")
@click.option("--out", help="Output folder: cache/, run/, model/ (the adapted teacher), adapt.json.")
@click.option("--heldout", multiple=True, help="Held-out text for accuracy before/after; repeatable.")
@click.option("--heldout-sequences", type=int, help="Held-out sequences scored. [64]")
@click.option("--text-column", help="Column holding the text. [text]")
@click.option("--format", type=click.Choice(["auto", "text", "json", "parquet", "csv", "tsv", "disk", "repo"]),
              help="What --data is, as for teacher-dump. [auto]")
@click.option("--seq-len", type=int, help="Tokens per sequence. [128]")
@click.option("--max-sequences", type=int, help="Use only the first N sequences of the corpus.")
@click.option("--max-steps", type=int, help="Optimizer steps. [100]")
@click.option("--batch-size", type=int, help="Sequences per step. [32]")
@click.option("--lr", type=float, help=f"Peak learning rate. [{ADAPT_LR:g}]")
@click.option("--warmup-steps", type=int, help=f"Linear warm-up steps. [{ADAPT_WARMUP_STEPS}]")
@click.option("--weight-decay", type=float, help="AdamW weight decay. [0.01]")
@click.option("--seed", type=int, help="Seed of masks and initialisation. [0]")
@click.option("--save-every", type=int, help="Checkpoint every N steps. [50]")
@click.option("--device", help="auto, cpu, cuda, cuda:N. [auto]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), help="Autocast of the "
              "training, as for student-train (fp16 scales the loss). [auto: bf16 on CUDA, fp32 on CPU]")
@compile_options("the encoder and MLM head being trained, as for student-train")
def command(config_file: Path | None, **flags: Any) -> None:
    """Train a masked-LM head (and the encoder under it) so a checkpoint can serve as a teacher."""
    echo_json(main(build_config(AdaptConfig, config_file, flags)))
