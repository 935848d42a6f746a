"""Downstream classification for `kdpipe eval`: load a labelled task, split it, fine-tune, score.

A task is a local file (CSV/TSV, JSON lines, a JSON array of records, Parquet) with a text and a
label column, a `datasets` dataset available offline (`name` or `name:config`), or
`builtin:NAME` (a JSONL file with `text` and `label`). Labels are compared as strings.

The split is a pure function of (seed, example index): examples are ranked by
SHA-256("kdpipe-split:{seed}:{index}") and the first round(n * dev_fraction) form the dev set, the
rest the training set in that same order (so `--max-train-examples N` takes a fixed random
subset). No RNG library is involved, so the split is the same on every machine and version.

Every model gets the same recipe: `AutoModelForSequenceClassification` from its folder ([CLS]
pooling as transformers does it: BERT's pooler, DistilBERT's pre-classifier; weights absent
from a masked-LM checkpoint, the pooler included, start from the seeded initialisation), AdamW
(no decay on biases and LayerNorm), linear warm-up then linear decay, gradient clipping at 1.0.
The seed fixes the head's initialisation, dropout and the order of examples; teacher and
students see the same order for the same seed.

A fixed learning rate and epoch count can leave one model near chance while suiting another, so
the comparison measures the recipe, not the models. A sweep chooses both per model, by the same
procedure for every model and never by the dev split that is reported: the training examples
are carved (SHA-256 ranked again, `tune_split`) into a tuning split and the rest; for each
learning rate of the grid one fine-tuning on the rest runs for the largest epoch count of the
grid and is scored on the tuning split after each epoch count of the grid (a run whose linear
decay spans the largest count and that stops after fewer epochs is the same run up to then, so
one run per rate scores every count). The best point (`choose`) is then fine-tuned on all the
training examples with each reporting seed: the chosen rate, stopped after the chosen epochs of
a schedule spanning the grid's largest count.

A student may also be distilled on the task (`SoftLabels`): fine-tuned against a fine-tuned
teacher's class logits on the same training examples as well as their labels, and on its logits
alone of a transfer set (training-pool examples after those fine-tuned on, labels never read).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdpipe.pipeline import metrics
from kdpipe.pipeline.corpus import looks_like_path
from kdpipe.pipeline.compiling import Compile, compiled
from kdpipe.pipeline.device import MIN_LOSS_SCALE, autocast, grad_scaler
from kdpipe.pipeline.errors import KdpipeError, first_line, tensor_file_errors
from kdpipe.pipeline.fsutil import sha256_file
from kdpipe.pipeline.losses import UNLABELLED, task_distill_loss
from kdpipe.pipeline.padding import pad
from kdpipe.pipeline.schedule import lr_at
from kdpipe.pipeline.teacher import quiet_transformers
from kdpipe.schemas.report import SweepPoint  # one (lr, epochs) of a sweep, as the report keeps it

_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
SPLIT_METHOD = "sha256-rank"  # see the module docstring


@dataclass(frozen=True)
class Task:
    name: str
    spec: str
    texts: list[str]
    labels: list[str]
    label_names: list[str]  # sorted; class i of the classifier is label_names[i]
    text_column: str
    label_column: str
    fingerprint: dict[str, Any]
    dropped: int  # rows without a usable text or label

    def label_counts(self) -> dict[str, int]:
        c = Counter(self.labels)
        return {k: c[k] for k in self.label_names}


# ------------------------------------------------------------------------------------ loading


def task_name(spec: str) -> str:
    """A short name for a task spec: the built-in name, the file stem, or the dataset name."""
    if spec.startswith("builtin:"):
        base = spec.split(":", 1)[1]
    elif os.path.splitext(spec)[1].lower() in _FORMATS or os.path.exists(spec):
        base = Path(spec).stem
    else:
        base = spec.replace("/", "-").replace(":", "-")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or "task"


def load_task(spec: str, text_column: str = "text", label_column: str = "label",
              split: str = "train", name: str | None = None) -> Task:
    """Read a task's (text, label) rows, dropping rows whose text or label is missing or empty."""
    name = name or task_name(spec)
    path = spec
    if spec.startswith("builtin:"):
        try:
            from kdpipe.pipeline import builtin
        except ImportError as e:
            raise KdpipeError(f"task {spec}: built-in tasks are unavailable ({e})") from None
        path = builtin.resolve(spec, "task")
    suffix = os.path.splitext(path)[1].lower()
    if os.path.exists(path):
        if os.path.isdir(path) or suffix not in _FORMATS:
            raise KdpipeError(f"task {spec}: unsupported task file (use .csv, .tsv, .jsonl, .json "
                              "or .parquet with a text and a label column)")
        rows, columns = _read_file(Path(path), _FORMATS[suffix], text_column, label_column)
        fingerprint = {"format": _FORMATS[suffix], "file": Path(path).name,
                       "bytes": os.path.getsize(path), "sha256": sha256_file(Path(path))}
    elif looks_like_path(path):
        raise KdpipeError(f"task file {spec} does not exist")
    else:
        rows, columns, fingerprint = _read_dataset(spec, split, text_column, label_column)
    for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if col not in columns:
            raise KdpipeError(f"task {spec} has no column {col!r} (columns: "
                              f"{', '.join(map(str, columns)) or 'none'}); set {flag}")
    texts, labels, dropped = [], [], 0
    for text, label in rows:
        label = _label_str(label)
        if not isinstance(text, str) or not text.strip() or label is None:
            dropped += 1
            continue
        texts.append(text)
        labels.append(label)
    if len(texts) < 2:
        raise KdpipeError(f"task {spec} has {len(texts)} usable example(s) (text in {text_column!r}, "
                          f"label in {label_column!r}); a task needs at least 2")
    names = sorted(set(labels), key=_label_key)
    if (fraction := _real_valued(names)) is not None:
        raise KdpipeError(f"task {spec}: the labels in {label_column!r} are real numbers (e.g. {fraction}; "
                          f"{len(names)} distinct values): eval fine-tunes a classifier, one class per label; "
                          "map the scores to classes first (e.g. score > 0 -> pos)")
    if len(names) < 2:
        raise KdpipeError(f"task {spec} has a single label ({names[0]!r} in column "
                          f"{label_column!r}); classification needs at least two classes")
    fingerprint = {**fingerprint, "rows": len(texts), "dropped": dropped,
                   "text_column": text_column, "label_column": label_column}
    return Task(name, spec, texts, labels, names, text_column, label_column, fingerprint, dropped)


def load_tasks(named_specs: Iterable[tuple[str | None, str]], text_column: str = "text",
               label_column: str = "label", split: str = "train") -> list[Task]:
    """`load_task` of each (name or None, spec); two tasks may not have the same name."""
    tasks = [load_task(spec, text_column, label_column, split, name) for name, spec in named_specs]
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise KdpipeError(f"two tasks are named {dup!r}; name them with --task NAME=SPEC")
    return tasks


def _label_str(v: Any) -> str | None:
    if v is None or isinstance(v, (list, dict)):
        return None
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if v.is_integer():
            v = int(v)
    s = str(v).strip()
    return s or None


def _real_valued(names: list[str]) -> str | None:
    """A label with a fractional part, if every label is a number (scores, not classes)."""
    try:
        values = [float(n) for n in names]
    except ValueError:
        return None
    return next((n for n, v in zip(names, values) if math.isfinite(v) and not v.is_integer()), None)


def _label_key(s: str) -> tuple[int, float, str]:
    try:
        return (0, float(s), s)
    except ValueError:
        return (1, 0.0, s)


def _read_file(path: Path, fmt: str, text_col: str, label_col: str) -> tuple[list[tuple], list[str]]:
    try:
        if fmt in ("csv", "tsv"):
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter="," if fmt == "csv" else "\t")
                columns = list(reader.fieldnames or [])
                rows = [(r.get(text_col), r.get(label_col)) for r in reader]
            return rows, columns
        if fmt == "parquet":
            import pyarrow.parquet as pq

            columns = pq.read_schema(path).names
            if text_col not in columns or label_col not in columns:
                return [], columns
            t = pq.read_table(path, columns=[text_col, label_col])
            return list(zip(t.column(0).to_pylist(), t.column(1).to_pylist())), columns
        records = _read_json_records(path, fmt)
    except UnicodeDecodeError as e:
        raise KdpipeError(f"task file {path} is not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise KdpipeError(f"cannot read task file {path}: {e.strerror or e}") from None
    except Exception as e:  # pyarrow's errors for a damaged Parquet file
        if isinstance(e, KdpipeError):
            raise
        raise KdpipeError(f"cannot read task file {path}: {e}") from None
    columns = list(dict.fromkeys(k for r in records for k in r))
    return [(r.get(text_col), r.get(label_col)) for r in records], columns


def _read_json_records(path: Path, fmt: str) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if fmt == "json" and text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise KdpipeError(f"task file {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        records = data
    else:
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise KdpipeError(f"task file {path}, line {i}: not valid JSON ({e.msg})") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise KdpipeError(f"task file {path} must hold JSON objects (one per line, or an array)")
    return records


def _read_dataset(spec: str, split: str, text_col: str, label_col: str
                  ) -> tuple[list[tuple], list[str], dict[str, Any]]:
    repo, _, config = spec.partition(":")
    try:
        import datasets

        datasets.disable_progress_bars()
        ds = datasets.load_dataset(repo, config or None, split=split)
    except Exception as e:  # datasets raises many types for "not available offline"
        raise KdpipeError(f"task {spec!r} is neither a local file nor a dataset available "
                          f"offline ({first_line(e)})") from None
    columns = list(ds.column_names)
    fingerprint = {"format": "dataset", "name": repo, "config": config or None, "split": split,
                   "dataset_fingerprint": getattr(ds, "_fingerprint", None)}
    if text_col not in columns or label_col not in columns:
        return [], columns, fingerprint
    labels = ds[label_col]
    feature = ds.features.get(label_col)
    if hasattr(feature, "int2str"):  # ClassLabel: use the class names
        labels = [feature.int2str(v) if isinstance(v, int) and v >= 0 else None for v in labels]
    return list(zip(ds[text_col], labels)), columns, fingerprint


# -------------------------------------------------------------------------------------- split


@dataclass(frozen=True)
class Split:
    train: list[int]  # example indices fine-tuned on, in training-pool order
    dev: list[int]  # example indices scored, ascending
    train_pool: int
    dev_pool: int
    seed: int
    dev_fraction: float
    # the transfer set: training-pool examples after `train`, whose labels are never used; the
    # task-distilled students are fine-tuned on the teacher's logits of them
    transfer: list[int] = field(default_factory=list)
    # augmented copies of the training examples that top the transfer set up (pipeline/augment.py)
    augmented: int = 0

    def record(self, examples: int, file: str) -> dict[str, Any]:
        transfer = {"transfer": len(self.transfer),
                    "transfer_indices_sha256": indices_sha(self.transfer)} if self.transfer else {}
        if self.augmented:
            transfer["augmented"] = self.augmented
        return {"method": SPLIT_METHOD, "seed": self.seed, "dev_fraction": self.dev_fraction,
                "examples": examples, "train": len(self.train), "dev": len(self.dev),
                "train_pool": self.train_pool, "dev_pool": self.dev_pool,
                "train_indices_sha256": indices_sha(self.train),
                "dev_indices_sha256": indices_sha(self.dev), "file": file, **transfer}


def indices_sha(ix: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ix)).encode()).hexdigest()


def split_rank(seed: int, index: int) -> bytes:
    return hashlib.sha256(f"kdpipe-split:{seed}:{index}".encode()).digest()


def split_indices(n: int, dev_fraction: float, seed: int, max_train: int | None = None,
                  max_dev: int | None = None, transfer: int = 0) -> Split:
    """A deterministic, disjoint train/dev split of n examples (see the module docstring), and up
    to `transfer` examples of the training pool after the `max_train` fine-tuned on (fewer where
    the pool has fewer left; none without a cap)."""
    if not 0 < dev_fraction < 1:
        raise KdpipeError(f"dev fraction must be between 0 and 1, got {dev_fraction}")
    if n < 2:
        raise KdpipeError(f"cannot split {n} example(s) into train and dev")
    n_dev = min(n - 1, max(1, round(n * dev_fraction)))
    order = sorted(range(n), key=lambda i: split_rank(seed, i))
    dev_pool, train_pool = order[:n_dev], order[n_dev:]
    dev = sorted(dev_pool[:max_dev] if max_dev else dev_pool)
    train = train_pool[:max_train] if max_train else train_pool
    extra = train_pool[len(train):len(train) + transfer]
    return Split(train, dev, len(train_pool), len(dev_pool), seed, dev_fraction, extra)


def tune_split(train: list[int], fraction: float, seed: int) -> list[int]:
    """The sweep's tuning split: round(n * fraction) of the training examples (at least one, and
    one left to fine-tune on), ranked by SHA-256("kdpipe-tune:{seed}:{index}"), ascending."""
    if not 0 < fraction < 1:
        raise KdpipeError(f"tune fraction must be between 0 and 1, got {fraction}")
    if len(train) < 2:
        raise KdpipeError(f"cannot carve a tuning split from {len(train)} training example(s)")
    n_tune = min(len(train) - 1, max(1, round(len(train) * fraction)))
    rank = lambda i: hashlib.sha256(f"kdpipe-tune:{seed}:{i}".encode()).digest()  # noqa: E731
    return sorted(sorted(train, key=rank)[:n_tune])


# ---------------------------------------------------------------------------------- fine-tune


@dataclass(frozen=True)
class Recipe:
    lr: float = 5e-5
    epochs: int = 3
    batch_size: int = 32
    max_length: int = 128
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    eval_batch_size: int = 64
    # the warm-up and linear decay span this many epochs [epochs]; more than `epochs` when a sweep
    # chose to stop before the end of its schedule
    schedule_epochs: int | None = None
    group_by_length: bool = False  # batches of similar length (see `train_batches`)

    @property
    def horizon(self) -> int:
        return self.schedule_epochs or self.epochs


@dataclass(frozen=True)
class SoftLabels:
    """What a student is fine-tuned against besides the labels (task distillation, DistilBERT's
    section 4.2): the fine-tuned teacher's class logits on the examples fine-tuned on, and the
    loss (1 - alpha) * CE(labels) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))."""

    logits: torch.Tensor  # (N + M, C) float32: the Encoded's train_ids, then its M transfer_ids
    alpha: float
    temperature: float

    def record(self) -> dict[str, float]:
        """How a fine-tune was distilled, as its part records it."""
        return distill_record(self.alpha, self.temperature)


def distill_record(alpha: float, temperature: float) -> dict[str, float]:
    return {"alpha": alpha, "temperature": temperature}


def choose(points: list[SweepPoint]) -> SweepPoint:
    """The best point: highest tuning accuracy, then macro-F1; ties go to fewer epochs, then the
    lower rate (the cheaper, more conservative setting)."""
    if not points:
        raise ValueError("a sweep needs at least one point")
    return max(points, key=lambda p: (p.accuracy, p.macro_f1, -p.epochs, -p.lr))


@dataclass(frozen=True)
class Encoded:
    """A task tokenized for one tokenizer: token ids and class indices of train and dev."""

    train_ids: list[list[int]]
    train_y: list[int]
    dev_ids: list[list[int]]
    dev_y: list[int]
    transfer_ids: list[list[int]] = field(default_factory=list)  # unlabelled: soft labels only
    # per transfer example: the training example it is an augmented copy of, or -1 (the pool's own)
    transfer_from: list[int] = field(default_factory=list)


def class_indices(task: Task, examples: list[int]) -> list[int]:
    """The classifier's class index of each example's label."""
    cls = {name: i for i, name in enumerate(task.label_names)}
    return [cls[task.labels[i]] for i in examples]


def encode_task(tokenizer: Any, task: Task, split: Split, max_length: int,
                augmented: list[tuple[int, str]] = ()) -> Encoded:
    """`augmented`: (training example, text) of each augmented copy, after the pool's transfer set."""
    def enc(texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        out = tokenizer(texts, truncation=True, max_length=max_length,
                        return_attention_mask=False, return_token_type_ids=False, verbose=False)
        return [list(x) for x in out["input_ids"]]

    def of(ix: list[int]) -> list[str]:
        return [task.texts[i] for i in ix]

    return Encoded(enc(of(split.train)), class_indices(task, split.train),
                   enc(of(split.dev)), class_indices(task, split.dev),
                   enc(of(split.transfer)) + enc([text for _, text in augmented]),
                   [-1] * len(split.transfer) + [ex for ex, _ in augmented])


def carve(data: Encoded, train: list[int], tune: list[int]) -> Encoded:
    """The sweep's data from a task's encoding: `data`'s training examples (indices `train`, in
    that order) outside `tune` to fine-tune on, those in `tune` to score; the same transfer set
    less the augmented copies of the examples in `tune` (they would show the tuning inputs)."""
    pos = {ix: p for p, ix in enumerate(train)}
    held = set(tune)
    fit = [pos[i] for i in train if i not in held]
    scored = [pos[i] for i in tune]
    kept = [j for j, src in enumerate(data.transfer_from or [-1] * len(data.transfer_ids)) if src not in held]
    return Encoded([data.train_ids[p] for p in fit], [data.train_y[p] for p in fit],
                   [data.train_ids[p] for p in scored], [data.train_y[p] for p in scored],
                   [data.transfer_ids[j] for j in kept],
                   [data.transfer_from[j] for j in kept] if data.transfer_from else [])


GROUP_POOL = 16  # batches per pool that `train_batches` sorts by length


def train_batches(lengths: list[int], batch_size: int, rng: torch.Generator,
                  group_by_length: bool) -> list[list[int]]:
    """One epoch's batches of example positions: a random permutation cut into batches or, when
    grouping, cut into pools of GROUP_POOL batches that are each sorted by length, then cut and
    shuffled as batches (what transformers' group_by_length does). Short sentences then stop
    paying for the padding of long ones: about half the tokens of a movie-sentiment epoch are
    padding otherwise (27 tokens on average, 50 in a random batch of 32). Either way every batch
    but the last is full, so an epoch has the same number of steps."""
    n = len(lengths)
    perm = torch.randperm(n, generator=rng).tolist()
    if not group_by_length:
        return [perm[b:b + batch_size] for b in range(0, n, batch_size)]
    pool = batch_size * GROUP_POOL
    out: list[list[int]] = []
    for c in range(0, n, pool):
        chunk = sorted(perm[c:c + pool], key=lambda i: lengths[i])
        out += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [out[i] for i in torch.randperm(len(out), generator=rng).tolist()]


def linear_schedule(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then linear decay to 0 at `total`
    (student-train's schedule.lr_at with a peak of 1)."""
    return lr_at(step, 1.0, total, warmup)


def load_classifier(path: str, label_names: list[str]) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    try:
        with quiet_transformers(), tensor_file_errors(path):  # "newly initialised weights" is expected
            return AutoModelForSequenceClassification.from_pretrained(
                path, local_files_only=True, num_labels=len(label_names),
                id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)},
            )
    except (OSError, ValueError) as e:
        raise KdpipeError(f"cannot build a classifier from {path}: {first_line(e)}") from None


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def finetune(model_path: str, pad_id: int, data: Encoded, label_names: list[str], recipe: Recipe,
             seed: int, device: torch.device,
             after_epoch: Callable[[int, torch.nn.Module], None] | None = None,
             compile_spec: Compile | None = None, soft: SoftLabels | None = None
             ) -> tuple[torch.nn.Module, int, float]:
    """A fresh classifier from `model_path` fine-tuned on `data`'s training examples for
    `recipe.epochs` epochs of a schedule spanning `recipe.horizon`, against their labels and, with
    `soft`, a teacher's logits on them too; `after_epoch(epochs done, model)` is called after each
    epoch (scoring there uses no random numbers, so it does not change the run). Returns the model
    (torch.compile's wrapper of it with `compile_spec`), its optimizer steps and the seconds spent
    training (compiling included).

    In fp16 the loss is scaled (torch.amp.GradScaler): an update whose gradients overflow is
    skipped and the scale halved, as in transformers' Trainer (the schedule still advances); one
    that overflows at a scale of 1, which no smaller scale undoes, stops the fine-tuning."""
    seqs, labels = data.train_ids, data.train_y
    if soft is not None:  # the transfer set too, without labels
        seqs, labels = seqs + data.transfer_ids, labels + [UNLABELLED] * len(data.transfer_ids)
        if soft.logits.shape != (len(seqs), len(label_names)):
            raise ValueError(f"soft labels of shape {tuple(soft.logits.shape)} for {len(seqs)} "
                             f"examples of {len(label_names)} classes")
    torch.manual_seed(seed)
    model = compiled(load_classifier(model_path, label_names).to(device), compile_spec)
    opt = torch.optim.AdamW(_param_groups(model, recipe.weight_decay), lr=recipe.lr)
    scaler = grad_scaler(device)
    n = len(seqs)
    per_epoch = math.ceil(n / recipe.batch_size)
    total = per_epoch * recipe.horizon
    warmup = int(recipe.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_schedule(s, warmup, total))
    order_rng = torch.Generator().manual_seed(seed)
    y_all = torch.tensor(labels, dtype=torch.long)
    lengths = [len(x) for x in seqs]
    seconds = 0.0
    for epoch in range(recipe.epochs):
        t0 = time.perf_counter()
        model.train()
        for ix in train_batches(lengths, recipe.batch_size, order_rng, recipe.group_by_length):
            ids, att = pad([seqs[i] for i in ix], pad_id)
            y = y_all[ix].to(device)
            with autocast(device):  # with soft labels the loss is ours (a batch may hold no label)
                out = model(input_ids=ids.to(device), attention_mask=att.to(device),
                            labels=y if soft is None else None)
            objective = out.loss if soft is None else task_distill_loss(
                out.logits, y, soft.logits[ix].to(device), soft.alpha, soft.temperature)
            (objective if scaler is None else scaler.scale(objective)).backward()
            if scaler is not None:
                scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            loss = objective.item()
            # fp16: an overflowing gradient is skipped while the scale can still fall; otherwise a
            # non-finite loss or gradient stops here, before the step, so nothing is kept
            skippable = scaler is not None and scaler.get_scale() > MIN_LOSS_SCALE
            if not math.isfinite(loss) or not (math.isfinite(float(norm)) or skippable):
                what = f"the classification loss is {loss}" if not math.isfinite(loss) else \
                    f"the gradient norm is {float(norm)}"
                raise KdpipeError(f"fine-tuning {model_path} (seed {seed}) stopped at step {sched.last_epoch + 1}: "
                                  f"{what}; no score is recorded for it: check that model's weights are finite")
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)  # skipped on an overflow
                scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - t0
        if after_epoch is not None:
            after_epoch(epoch + 1, model)
    return model, per_epoch * recipe.epochs, seconds


def finetune_and_score(model_path: str, pad_id: int, data: Encoded, label_names: list[str],
                       recipe: Recipe, seed: int, device: torch.device,
                       compile_spec: Compile | None = None, soft: SoftLabels | None = None,
                       train_logits: bool = False) -> dict[str, Any]:
    """Fine-tune a fresh classifier from `model_path` with `seed` (against `soft` too, if given);
    accuracy and macro-F1 on dev, the dev predictions themselves (kept in the eval part for paired
    comparisons) and, with `train_logits`, the model's logits on the examples it was fine-tuned on
    (a teacher's, for students distilled on the task)."""
    model, steps, train_seconds = finetune(model_path, pad_id, data, label_names, recipe, seed, device,
                                           compile_spec=compile_spec, soft=soft)
    preds = predict(model, data.dev_ids, pad_id, recipe.eval_batch_size, device)
    gold = data.dev_y
    out = {"seed": seed, "accuracy": metrics.accuracy(preds, gold),
           "macro_f1": metrics.macro_f1(preds, gold), "steps": steps,
           "train_seconds": round(train_seconds, 3), "lr": recipe.lr, "epochs": recipe.epochs,
           "schedule_epochs": recipe.horizon,
           "dev_predictions": preds}  # class indices in dev order: paired comparisons between models
    if soft is not None:
        out["task_distill"] = soft.record()
    if train_logits:  # the transfer set's after the training examples'
        out["train_logits"] = class_logits(model, data.train_ids + data.transfer_ids, pad_id,
                                           recipe.eval_batch_size, device).tolist()
    return out


def sweep_rate(model_path: str, pad_id: int, data: Encoded, label_names: list[str], recipe: Recipe,
               epochs: list[int], seed: int, device: torch.device,
               compile_spec: Compile | None = None, soft: SoftLabels | None = None) -> dict[str, Any]:
    """One learning rate of a sweep: fine-tune on `data`'s training side (the training examples
    outside the tuning split) for max(epochs) epochs at `recipe.lr` and score `data`'s dev side
    (the tuning split) after each epoch count in `epochs`."""
    wanted = set(epochs)
    scores: dict[str, dict[str, float]] = {}

    def score(done: int, model: torch.nn.Module) -> None:
        if done in wanted:
            preds = predict(model, data.dev_ids, pad_id, recipe.eval_batch_size, device)
            scores[str(done)] = {"accuracy": metrics.accuracy(preds, data.dev_y),
                                 "macro_f1": metrics.macro_f1(preds, data.dev_y)}

    longest = max(epochs)
    run = Recipe(**{**recipe.__dict__, "epochs": longest, "schedule_epochs": longest})
    _, steps, seconds = finetune(model_path, pad_id, data, label_names, run, seed, device, score, compile_spec,
                                 soft)
    out = {"lr": recipe.lr, "seed": seed, "scores": scores, "steps": steps,
           "train_seconds": round(seconds, 3), "fit_examples": len(data.train_ids),
           "tune_examples": len(data.dev_ids)}
    if soft is not None:
        out["task_distill"] = soft.record()
    return out


@torch.inference_mode()
def class_logits(model: torch.nn.Module, seqs: list[list[int]], pad_id: int, batch_size: int,
                 device: torch.device) -> torch.Tensor:
    """(N, C) float32 class logits of each sequence, on the CPU; batches of similar length so
    little is spent on padding."""
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: torch.Tensor | None = None
    for b in range(0, len(order), batch_size):
        ix = order[b:b + batch_size]
        ids, att = pad([seqs[i] for i in ix], pad_id)
        with autocast(device):
            logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits  # (B, C)
        if out is None:
            out = torch.empty(len(seqs), logits.shape[-1])
        out[ix] = logits.float().cpu()
    return out if out is not None else torch.empty(0, 0)


def predict(model: torch.nn.Module, seqs: list[list[int]], pad_id: int, batch_size: int,
            device: torch.device) -> list[int]:
    """Class index of each sequence."""
    return class_logits(model, seqs, pad_id, batch_size, device).argmax(-1).tolist()
