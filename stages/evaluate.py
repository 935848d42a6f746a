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
shared by every student), with a sweep (`--sweep-lr`, `--sweep-epochs`) each model's sweep runs,
one per learning rate, then the fine-tunes seed by seed, task by task, model by model, each with
its model's recipe (the sweep's choice, see `pipeline/downstream.py`, or the fixed one), a student
named by `--task-distill` against the teacher's logits of the same seed as well. Each
finished unit is written atomically under parts/ and never redone: an interrupted eval, `kill -9`
included, resumes where it stopped. `--seeds` may be raised on a rerun; the seeds already done
are reused. Finish: assemble report.json, report.md and the plots, each written atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import click
import torch
from pydantic import Field, field_validator, model_validator

from kdpipe.pipeline import corpus as corpus_mod
from kdpipe.pipeline import augment, downstream, mlm_eval, model_card, report_dir, sections, speed
from kdpipe.pipeline import report as render
from kdpipe.pipeline import storage
from kdpipe.pipeline.compiling import CompileSettings, compile_options
from kdpipe.pipeline.config import (
    MAX_SEED, build_config, config_option, echo_json, floats_option, ints_option, sorted_distinct,
)
from kdpipe.pipeline.device import configure, pick_device
from kdpipe.pipeline.errors import KdpipeError
from kdpipe.pipeline.fsutil import (
    atomic_write_bytes, atomic_write_json, dumps_json, ensure_dir, exclusive_lock, sha256_bytes,
)
from kdpipe.pipeline.masking import MaskingSpec
from kdpipe.pipeline.models import Model, load_model, read_curves, resolve_models, split_name
from kdpipe.pipeline.provenance import provenance
from kdpipe.pipeline.report_dir import Parts, augment_key, soft_key, sweep_key, task_key
from kdpipe.schemas.report import MARKDOWN_NAME, REPORT_NAME, ModelEntry, Report


class EvalConfig(CompileSettings):
    teacher: str
    students: list[str] = Field(min_length=1)
    out: str
    heldout: list[str] = []
    tasks: list[str] = []
    baseline: str | None = None  # the student the ablation table compares against [first]
    # masked LM on held-out text
    heldout_text_column: str = "text"
    heldout_format: Literal[corpus_mod.FORMATS] = "auto"  # type: ignore[valid-type]
    heldout_split: str = "train"
    heldout_sequences: int = Field(256, ge=1)
    seq_len: int = Field(128, ge=8, le=65535)
    packing: Literal["pack", "line"] = "pack"
    mask_prob: float = Field(0.15, gt=0, lt=1)
    mask_token_prob: float = Field(0.8, ge=0, le=1)
    random_token_prob: float = Field(0.1, ge=0, le=1)
    mask_seed: int = Field(0, ge=0, le=MAX_SEED)
    # downstream
    text_column: str = "text"
    label_column: str = "label"
    task_split: str = "train"
    seeds: int = Field(3, ge=1, le=100)
    split_seed: int = Field(0, ge=0, le=MAX_SEED)
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
    group_by_length: bool = False
    # a sweep choosing lr and epochs per model on a tuning split carved from the training examples
    sweep_lr: list[float] = []
    sweep_epochs: list[int] = []
    tune_fraction: float = Field(0.2, gt=0, lt=1)
    sweep_seeds: int = Field(1, ge=1, le=100)
    # students fine-tuned against the fine-tuned teacher's logits as well as the labels
    task_distill: list[str] = []  # student names, or ["all"]
    task_distill_alpha: float = Field(0.5, gt=0, le=1)
    task_distill_temperature: float = Field(2.0, gt=0)
    task_distill_transfer: int = Field(0, ge=0)  # unlabelled training-pool examples per task
    task_distill_augment: bool = False  # top the transfer set up with augmented copies (pipeline/augment.py)
    # size and speed
    speed: bool = True
    speed_batch_size: int = Field(32, ge=1)
    speed_seq_len: int = Field(128, ge=4)
    speed_repeats: int = Field(10, ge=1)
    speed_warmup: int = Field(2, ge=0)
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    tf32: bool = False
    model_cards: bool = True  # fill in the evaluation section of each kdpipe student's model card

    @field_validator("students", "tasks", "heldout", "task_distill")
    @classmethod
    def _no_blank(cls, v: list[str]) -> list[str]:
        if any(not s.strip() for s in v):
            raise ValueError("must not be empty")
        return v

    @field_validator("sweep_lr", "sweep_epochs")
    @classmethod
    def _grid(cls, v: list[Any]) -> list[Any]:
        return sorted_distinct(v, lambda x: x <= 0, "must be positive")

    @model_validator(mode="after")
    def _probs(self) -> "EvalConfig":
        if self.mask_token_prob + self.random_token_prob > 1:
            raise ValueError("mask_token_prob + random_token_prob must not exceed 1")
        return self

    @property
    def sweeping(self) -> bool:
        return bool(self.sweep_lr or self.sweep_epochs)

    def grid(self) -> tuple[list[float], list[int]]:
        """The sweep's learning rates and epoch counts; an axis not given is the fixed value."""
        return self.sweep_lr or [self.lr], self.sweep_epochs or [self.epochs]

    def distill_record(self) -> dict[str, float]:
        return downstream.distill_record(self.task_distill_alpha, self.task_distill_temperature)

    def soft_labels(self, logits: list[list[float]]) -> downstream.SoftLabels:
        return downstream.SoftLabels(torch.tensor(logits, dtype=torch.float32), self.task_distill_alpha,
                                     self.task_distill_temperature)

    def heldout_spec(self) -> mlm_eval.Heldout:
        masking = MaskingSpec(self.mask_prob, self.mask_token_prob, self.random_token_prob, 0.0,
                              self.mask_seed)
        return mlm_eval.Heldout(tuple(self.heldout), self.heldout_text_column, self.heldout_sequences,
                                self.seq_len, self.packing, masking, self.eval_batch_size,
                                self.heldout_format, self.heldout_split)

    def bench(self) -> speed.Bench:
        return speed.Bench(self.speed_batch_size, self.speed_seq_len, self.speed_repeats,
                           self.speed_warmup)

    def recipe(self) -> downstream.Recipe:
        return downstream.Recipe(self.lr, self.epochs, self.batch_size, self.max_length,
                                 self.weight_decay, self.warmup_ratio, self.eval_batch_size,
                                 group_by_length=self.group_by_length)


@dataclass
class Setup:
    cfg: EvalConfig
    out: Path
    device: torch.device
    models: list[Model]  # teacher first
    heldout: corpus_mod.Corpus | None
    tasks: list[downstream.Task]
    splits: dict[str, downstream.Split]
    tunes: dict[str, list[int]]  # task -> its tuning split (training examples), when sweeping
    distilled: set[str]  # the students fine-tuned against the teacher's logits too
    settings: dict[str, Any]  # eval.json content
    parts: Parts
    warnings: list[str]

    @property
    def teacher(self) -> Model:
        return self.models[0]

    @property
    def students(self) -> list[Model]:
        return self.models[1:]


def say(msg: str) -> None:
    click.echo(f"[eval] {msg}", err=True)


def set_up(cfg: EvalConfig) -> Setup:
    """Every input resolved, loaded and checked; nothing is computed or written yet."""
    teacher, *students = resolve_models(cfg.teacher, cfg.students, cfg.baseline)
    heldout = mlm_eval.resolve_heldout(cfg.heldout_spec()) if cfg.heldout else None
    tasks = downstream.load_tasks(map(split_name, cfg.tasks), cfg.text_column, cfg.label_column,
                                  cfg.task_split)
    for t in tasks:
        if t.dropped:
            say(f"note: task {t.name}: {t.dropped} of {t.dropped + len(t.texts)} rows have no text or no label "
                "and are skipped")
    if cfg.task_distill_transfer and not cfg.task_distill:
        raise KdpipeError("--task-distill-transfer is the transfer set of the students --task-distill names; "
                          "name them")
    if cfg.task_distill_augment and not cfg.task_distill_transfer:
        raise KdpipeError("--task-distill-augment tops the transfer set up to --task-distill-transfer "
                          "examples per task: give that size")
    splits = {t.name: downstream.split_indices(len(t.texts), cfg.dev_fraction, cfg.split_seed,
                                               cfg.max_train_examples, cfg.max_dev_examples,
                                               cfg.task_distill_transfer) for t in tasks}
    if cfg.task_distill_augment:
        splits = {name: replace(sp, augmented=cfg.task_distill_transfer - len(sp.transfer))
                  for name, sp in splits.items()}
    for name, sp in splits.items():
        if sp.augmented > augment.MAX_COPIES * len(sp.train):
            raise KdpipeError(f"--task-distill-transfer {cfg.task_distill_transfer} with --task-distill-augment needs "
                              f"{sp.augmented} augmented copies of task {name}'s {len(sp.train)} training examples; "
                              f"at most {augment.MAX_COPIES} copies of each are made: ask for a smaller transfer set")
        pool = (f"note: task {name}: its training pool has {len(sp.transfer)} examples besides the "
                f"{len(sp.train)} fine-tuned on")
        if sp.augmented:
            say(f"{pool}; {sp.augmented} augmented copies of the training examples top the transfer set up to "
                f"{cfg.task_distill_transfer}")
        elif len(sp.transfer) < cfg.task_distill_transfer:
            say(f"{pool}, so the transfer set has {len(sp.transfer)}, not {cfg.task_distill_transfer}"
                + ("" if cfg.max_train_examples else " (set --max-train-examples)"))
    tunes = {name: downstream.tune_split(sp.train, cfg.tune_fraction, cfg.split_seed)
             for name, sp in splits.items()} if cfg.sweeping else {}
    distilled = task_distilled(cfg.task_distill, [m.name for m in students], bool(tasks))
    load_model(teacher)
    if cfg.task_distill_augment and teacher.missing_head:
        raise KdpipeError(f"--task-distill-augment needs the teacher's masked-LM head, and {teacher.path} has none")
    for s in students:
        load_model(s, teacher.tokenizer)
    models = [teacher, *students]
    warnings = []
    if heldout is not None:
        mlm_eval.check_comparable(teacher, models)
        warnings += mlm_eval.overlap_warnings(students, heldout)
    device = pick_device(cfg.device)
    settings = report_dir.settings(cfg.model_dump(mode="json"), device, models, tasks, heldout, cfg.speed,
                                   cfg.compile_record(), sorted(distilled))
    out = Path(cfg.out)
    return Setup(cfg, out, device, models, heldout, tasks, splits, tunes, distilled, settings,
                 Parts(out, sha256_bytes(dumps_json(settings))), warnings)


def task_distilled(asked: list[str], students: list[str], tasks: bool) -> set[str]:
    """The students `--task-distill` names (`all`: every one); each must be a student."""
    if asked and not tasks:
        raise KdpipeError("--task-distill needs a downstream task (--task)")
    if "all" in asked:
        return set(students)
    unknown = [n for n in asked if n not in students]
    if unknown:
        raise KdpipeError(f"--task-distill {unknown[0]!r} is not a student (students: {', '.join(students)})")
    return set(asked)


def sweep_points(s: Setup, task: str, model: str) -> list[downstream.SweepPoint]:
    """Every (lr, epochs) of the grid with its tuning scores, from the finished sweep parts."""
    lrs, epochs = s.cfg.grid()
    points = []
    for lr in lrs:
        runs = [s.parts.done(sweep_key(task, model, lr, k))["scores"] for k in range(s.cfg.sweep_seeds)]
        for e in epochs:
            points.append(downstream.SweepPoint(
                lr=lr, epochs=e, accuracy=sum(r[str(e)]["accuracy"] for r in runs) / len(runs),
                macro_f1=sum(r[str(e)]["macro_f1"] for r in runs) / len(runs)))
    return points


def model_recipe(s: Setup, task: str, model: str) -> downstream.Recipe:
    """The recipe a model is fine-tuned with on a task: the fixed one, or its sweep's choice."""
    recipe = s.cfg.recipe()
    if not s.cfg.sweeping:
        return recipe
    best = downstream.choose(sweep_points(s, task, model))
    return replace(recipe, lr=best.lr, epochs=best.epochs, schedule_epochs=max(s.cfg.grid()[1]))


def run(s: Setup) -> dict[str, int]:
    """Every unit not yet in parts/: speed, masked LM, fine-tunes. Returns done/reused counts."""
    done = reused = 0
    if s.cfg.speed:
        if s.parts.read("speed") is None:
            say(f"speed: {len(s.models)} models interleaved, {s.cfg.speed_repeats} repeats")
            data = speed.measure({m.name: m.module for m in s.models}, s.teacher.tokenizer,
                                 s.cfg.bench(), s.device, s.cfg.compile_spec())
            s.parts.write("speed", "speed", data)
            done += 1
        else:
            reused += 1
    if s.heldout is not None:
        pending = [m for m in s.models if s.parts.read(f"mlm/{m.name}") is None]
        reused += len(s.models) - len(pending)
        if pending:
            say(f"masked LM on held-out text: {', '.join(m.name for m in pending)}")
            scores = mlm_eval.score(s.cfg.heldout_spec(), s.heldout, s.teacher, pending, s.device,
                                    s.cfg.compile_spec())
            for name, data in scores.items():
                s.parts.write("mlm", f"mlm/{name}", data)
                done += 1
    encoded: dict[tuple[str, str], downstream.Encoded] = {}  # one encoding per task and tokenizer

    def augmented(task: downstream.Task) -> list[tuple[int, str]]:
        """The task's augmented copies, made once by the teacher's masked LM (pipeline/augment.py)."""
        nonlocal done
        sp = s.splits[task.name]
        if not sp.augmented:
            return []
        key = augment_key(task.name)
        part = s.parts.read(key)
        if part is None:
            copies = augment.sources(sp.train, sp.augmented)
            t0 = time.perf_counter()
            texts = augment.augment(s.teacher.module.to(s.device), s.teacher.tokenizer, task.texts, copies,
                                    s.cfg.split_seed, s.cfg.max_length, s.device)
            s.teacher.module.cpu()
            part = {"sources": [ex for ex, _ in copies], "texts": texts, "task": task.name}
            s.parts.write("augment", key, part)
            done += 1
            say(f"{task.name} | {s.teacher.name} | {len(texts)} augmented copies of the training examples "
                f"({time.perf_counter() - t0:.1f} s)")
        return list(zip(part["sources"], part["texts"]))

    def data(task: downstream.Task, m: Model) -> downstream.Encoded:
        ek = (task.name, m.tokenizer_sha)
        if ek not in encoded:
            encoded[ek] = downstream.encode_task(m.tokenizer, task, s.splits[task.name], s.cfg.max_length,
                                                 augmented(task))
        m.module.cpu()  # fine-tuning loads its own copy; free the accelerator
        return encoded[ek]

    def sweep_soft(task: downstream.Task, k: int) -> downstream.SoftLabels:
        """The teacher's logits on the sweep's fit examples, from the teacher fine-tuned on them
        alone with its own chosen recipe and sweep seed k: the tuning split stays unseen."""
        nonlocal done
        key = soft_key(task.name, k)
        part = s.parts.read(key)
        if part is None:
            t = s.teacher
            fit = downstream.carve(data(task, t), s.splits[task.name].train, s.tunes[task.name])
            part = downstream.finetune_and_score(str(t.path), t.tokenizer.pad_token_id, fit, task.label_names,
                                                 model_recipe(s, task.name, t.name), k, s.device,
                                                 s.cfg.compile_spec(), train_logits=True)
            s.parts.write("soft", key, {**part, "model": t.name, "task": task.name})
            done += 1
            say(f"{task.name} | {t.name} | soft labels of the sweep's fit examples, seed {k} "
                f"(tuning accuracy {part['accuracy']:.4f})")
        return s.cfg.soft_labels(part["train_logits"])

    if s.cfg.sweeping:
        lrs, epochs = s.cfg.grid()
        base = s.cfg.recipe()
        for task in s.tasks:
            for m in s.models:
                for lr in lrs:
                    for k in range(s.cfg.sweep_seeds):
                        key = sweep_key(task.name, m.name, lr, k)
                        if s.parts.read(key) is not None:
                            reused += 1
                            continue
                        sweep_data = downstream.carve(data(task, m), s.splits[task.name].train,
                                                      s.tunes[task.name])
                        soft = sweep_soft(task, k) if m.name in s.distilled else None
                        result = downstream.sweep_rate(str(m.path), m.tokenizer.pad_token_id, sweep_data,
                                                       task.label_names, replace(base, lr=lr), epochs, k,
                                                       s.device, s.cfg.compile_spec(), soft)
                        s.parts.write("sweep", key, {**result, "model": m.name, "task": task.name})
                        done += 1
                        say(f"{task.name} | {m.name} | sweep lr {lr:g} seed {k}: tuning accuracy "
                            + ", ".join(f"{e} ep {result['scores'][str(e)]['accuracy']:.4f}" for e in epochs)
                            + f" ({result['train_seconds']:.1f} s)")
    recipes = {(t.name, m.name): model_recipe(s, t.name, m.name) for t in s.tasks for m in s.models}
    for seed in range(s.cfg.seeds):
        for task in s.tasks:
            for m in s.models:
                key = task_key(task.name, m.name, seed)
                recipe = recipes[task.name, m.name]
                distill = s.cfg.distill_record() if m.name in s.distilled else None
                keep_logits = m is s.teacher and bool(s.distilled)  # the distilled students' soft labels
                if fits(s.parts.read(key), recipe, distill, keep_logits):
                    reused += 1
                    continue
                soft = None if distill is None else \
                    s.cfg.soft_labels(s.parts.done(task_key(task.name, s.teacher.name, seed))["train_logits"])
                try:
                    result = downstream.finetune_and_score(str(m.path), m.tokenizer.pad_token_id, data(task, m),
                                                           task.label_names, recipe, seed, s.device,
                                                           s.cfg.compile_spec(), soft, keep_logits)
                except KdpipeError as e:
                    raise KdpipeError(f"task {task.name}: {e}") from None
                s.parts.write("task", key, {**result, "model": m.name, "task": task.name})
                done += 1
                say(f"{task.name} | {m.name} | seed {seed}: accuracy {result['accuracy']:.4f}, "
                    f"macro-F1 {result['macro_f1']:.4f} (lr {recipe.lr:g}, {recipe.epochs} epochs, "
                    f"{result['train_seconds']:.1f} s)")
    return {"computed": done, "reused": reused}


def fits(part: dict[str, Any] | None, recipe: downstream.Recipe, distill: dict[str, float] | None = None,
         train_logits: bool = False) -> bool:
    """Whether a fine-tuning part was made with `recipe`'s rate and epochs (a part from before
    they were recorded was made with the fixed recipe of the same settings), against the same
    soft labels' weight and temperature (`distill`: None for a plain fine-tune), and keeps its
    training logits if they are needed."""
    if part is None:
        return False
    return (part.get("lr", recipe.lr), part.get("epochs", recipe.epochs),
            part.get("schedule_epochs", recipe.horizon)) == (recipe.lr, recipe.epochs, recipe.horizon) \
        and part.get("task_distill") == distill and (not train_logits or "train_logits" in part)


def finish(s: Setup) -> Report:
    """report.json, report.md and the plots from the parts, each written atomically."""
    cfg, done = s.cfg, s.parts.done
    names = [m.name for m in s.models]
    scores = {t.name: {n: [done(task_key(t.name, n, k)) for k in range(cfg.seeds)] for n in names}
              for t in s.tasks}
    sweep = sections.Sweep(*cfg.grid(), cfg.tune_fraction, cfg.sweep_seeds) if cfg.sweeping else None
    tasks = [sections.task_section(t, s.splits[t.name], report_dir.split_file(t.name), cfg.recipe(),
                                   scores[t.name], sweep, s.tunes.get(t.name),
                                   {n: sweep_points(s, t.name, n) for n in names} if sweep else None)
             for t in s.tasks]
    baseline = (cfg.baseline or names[1]) if tasks and len(s.students) >= 2 else None
    predictions = {task: {n: [d.get("dev_predictions") for d in seeds] for n, seeds in by_model.items()}
                   for task, by_model in scores.items()}
    gold = {t.name: downstream.class_indices(t, s.splits[t.name].dev) for t in s.tasks}
    report = Report(
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        teacher=names[0], students=names[1:], baseline=baseline,
        models=[ModelEntry(**m.entry) for m in s.models],
        mlm=sections.mlm_section({n: done(f"mlm/{n}") for n in names}, cfg.heldout_spec(),
                                 s.heldout.fingerprint) if s.heldout is not None else None,
        speed=sections.speed_section(done("speed"), names, cfg.bench()) if cfg.speed else None,
        tasks=tasks, ablation=sections.ablation(tasks, names, baseline, predictions, gold) if baseline else [],
        warnings=s.warnings, provenance={**provenance(cfg), "settings_sha256": s.parts.settings_sha},
    )
    plots = render.plots(report, {m.name: read_curves(m) for m in s.students if m.metrics_file})
    for name, png in plots.items():
        atomic_write_bytes(s.out / name, png)
    report = report.model_copy(update={"plots": list(plots)})
    atomic_write_bytes(s.out / MARKDOWN_NAME, render.render_markdown(report).encode())
    atomic_write_json(s.out / REPORT_NAME, report.model_dump(mode="json"))  # last: the commit point
    return report


def main(cfg: EvalConfig) -> dict[str, Any]:
    """The whole stage; returns a summary for the CLI to print. An --out URL is staged locally and
    published by `storage.staged` (report.json last), which calls this again with the local folder."""
    if storage.is_url(cfg.out):
        return storage.staged(cfg, main, writes={"out": "report"})
    s = set_up(cfg)
    configure(cfg.precision, cfg.tf32)
    ensure_dir(s.out, "report directory")
    with exclusive_lock(s.out, "report directory"):
        s.parts.remove_stale_tmp()
        resumed = report_dir.guard_settings(s.out, s.settings)
        for w in s.warnings:
            say(f"warning: {w}")
        report_dir.write_splits(s.out, s.tasks, s.splits, s.tunes)
        counts = run(s)
        report = finish(s)
    cards = fill_model_cards(s, report) if cfg.model_cards else []
    return {"report": str(s.out / MARKDOWN_NAME), "resumed": resumed, **counts, **render.headline(report),
            "model_cards": cards}


def fill_model_cards(s: Setup, report: Report) -> list[str]:
    """The evaluation section of the model card (README.md) of every student that has a kdpipe
    card, from this report; the cards written. A card that cannot be written is named, not fatal.
    A run named twice (plain and `--task-distill`, say) gets its first name's section."""
    written, seen = [], set()
    for m in s.students:
        if m.path.resolve() in seen:
            continue
        seen.add(m.path.resolve())
        section = model_card.eval_section(report, m.name, storage.display(s.out))
        try:
            if model_card.fill_eval(m.path, section):
                written.append(str(m.path / model_card.CARD_NAME))
        except OSError as e:
            say(f"warning: the model card of {m.name} was not updated: {e}")
    return written


@click.command("eval", epilog="Example: kdpipe eval --teacher ./teacher --student runs/full "
               "--student no-ce=runs/no-ce --heldout heldout.txt --task builtin:movie-sentiment "
               "--out reports/r1 --seeds 3 --max-train-examples 2000. Held-out text in a CSV whose name "
               "does not say so: --heldout export.dat --heldout-format csv --heldout-text-column review.")
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
@click.option("--out", help="Report directory to create or resume, or a URL (s3://bucket/path, ...).")
@click.option("--baseline", help="Student the ablation table compares against. [first student]")
@click.option("--heldout-sequences", type=int, help="Held-out sequences scored. [256]")
@click.option("--heldout-text-column", help="Text column of JSONL/Parquet/CSV held-out data. [text]")
@click.option("--heldout-format", type=click.Choice(list(corpus_mod.FORMATS)), help="What the --heldout "
              "files are, where their names do not say, as teacher-dump's --format: text, json, parquet, "
              "csv, tsv, disk, repo. [auto: from the name; any other extension is text]")
@click.option("--heldout-split", help="Split of a held-out dataset, save_to_disk DatasetDict or dataset "
              "repository folder. [train]")
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
@click.option("--group-by-length/--no-group-by-length", default=None, help="Fine-tune on batches "
              "of similar length (pools of 16 batches sorted by length, then shuffled): about half "
              "the padded tokens of random batches on movie sentiment. [off]")
@click.option("--sweep-lr", callback=floats_option, help="Learning rates a sweep tries per model, "
              "e.g. 5e-5,1e-4,2e-4, each scored on a tuning split of the training examples; the "
              "best is then fine-tuned on all of them. [no sweep: --lr]")
@click.option("--sweep-epochs", callback=ints_option, help="Epoch counts the sweep tries, e.g. "
              "2,3,4 (one run per rate, scored after each). [no sweep: --epochs]")
@click.option("--tune-fraction", type=float, help="Share of the training examples the sweep "
              "scores on (never the dev split). [0.2]")
@click.option("--sweep-seeds", type=int, help="Seeds per sweep point; their mean decides. [1]")
@click.option("--task-distill", "task_distill", multiple=True, help="A student fine-tuned against the "
              "fine-tuned teacher's class logits on the training examples as well as their labels "
              "(DistilBERT's distillation during fine-tuning; the teacher of the same seed, and in a "
              "sweep the teacher fine-tuned on the sweep's fit examples alone). Repeatable; 'all' for "
              "every student. [none]")
@click.option("--task-distill-alpha", type=float, help="Weight of the soft labels' KL in that loss, "
              "(1 - alpha) * CE + alpha * T^2 * KL. [0.5]")
@click.option("--task-distill-temperature", type=float, help="Temperature T of that KL. [2.0]")
@click.option("--task-distill-transfer", type=int, help="A transfer set for those students: up to N more "
              "examples of each task's training pool (after the --max-train-examples fine-tuned on; never "
              "dev), their labels never used, fine-tuned on with the teacher's logits only. [0]")
@click.option("--task-distill-augment/--no-task-distill-augment", default=None, help="Top each task's "
              "transfer set up to --task-distill-transfer with augmented copies of the training examples where "
              "the pool runs short: word pieces replaced by the pretrained teacher's masked-LM guesses "
              "(TinyBERT's data augmentation). [off]")
@click.option("--speed/--no-speed", default=None, help="Measure latency and throughput. [on]")
@click.option("--speed-batch-size", type=int, help="Batch size of the throughput test. [32]")
@click.option("--speed-seq-len", type=int, help="Tokens per sequence of the speed test. [128]")
@click.option("--speed-repeats", type=int, help="Timed repeats per model (median reported). [10]")
@click.option("--speed-warmup", type=int, help="Untimed warm-up calls per model. [2]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), help="Autocast of every "
              "forward pass (speed, masked LM, fine-tuning; fp16 fine-tuning scales the loss). "
              "[auto: bf16 on CUDA, fp32 on CPU]")
@click.option("--tf32/--no-tf32", default=None, help="Let CUDA use TF32 for float32 matmuls. [off]")
@compile_options("every model's forward pass (speed: never timing the compile, masked LM, fine-tuning)")
@click.option("--model-cards/--no-model-cards", default=None, help="Fill in the evaluation section of each "
              "kdpipe student's model card (final/README.md) from this report. [on]")
@click.option("--device", help="auto, cpu, cuda, cuda:N. [auto]")
def command(config_file: Path | None, **flags: Any) -> None:
    """Compare teacher and students: masked LM, downstream fine-tuning, size and speed."""
    echo_json(main(build_config(EvalConfig, config_file, flags)))
