"""The evaluation report (report.json), its resumable parts (parts/*.json) and eval.json.

Version 1. Every file is validated on read, so a hand-edited or damaged one is refused (or, for
a part, recomputed) with the field that is wrong. Scores are fractions in [0, 1]; retentions are
percentages of the teacher's score; times are milliseconds, throughputs sequences per second.

REPORT_DIR/
  eval.json        settings and input fingerprints the parts were computed with (written first)
  parts/*.json     one finished unit each: mlm-<model>, speed, task-<task>-<model>-seed<k>,
                   sweep-<task>-<model>-lr<lr>-seed<k> (one learning rate of a sweep)
  splits/*.json    each task's train/dev example indices
  report.json      this schema; report.md and *.png beside it
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

REPORT_FORMAT = "kdpipe-eval-report"
REPORT_VERSION = 1
PART_FORMAT = "kdpipe-eval-part"
SETTINGS_FORMAT = "kdpipe-eval-settings"
REPORT_NAME = "report.json"
MARKDOWN_NAME = "report.md"
SETTINGS_NAME = "eval.json"
PARTS_DIR = "parts"
SPLITS_DIR = "splits"
CURVES_NAME = "training_curves.png"  # the report's figures
RETENTION_NAME = "retention.png"
TRADEOFF_NAME = "tradeoff.png"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Spread(_Frozen):
    median: float
    min: float
    max: float
    values: list[float]


class ModelEntry(_Frozen):
    """One evaluated model: where it came from and its size."""

    name: str
    role: Literal["teacher", "student"]
    path: str  # the model folder
    run_dir: str | None = None  # a student-train run directory, when given one
    metrics_file: str | None = None
    weights_files: list[str]
    weights_bytes: int = Field(ge=0)
    weights_sha256: str
    parameters: int = Field(ge=0)  # the encoder (embeddings + layers), as the paper counts
    parameters_with_head: int = Field(ge=0)  # the whole masked LM, tied weights once
    layers: int | None = None
    hidden_size: int | None = None
    vocab_size: int
    architecture: str | None = None  # the transformers class (BertForMaskedLM, DistilBertForMaskedLM)


# --------------------------------------------------------------------------------- masked LM


class MlmResult(_Frozen):
    model: str
    masked_tokens: int
    top1_accuracy: float
    top5_accuracy: float
    mean_cross_entropy: float
    perplexity: float
    teacher_agreement: float | None = None  # students only
    kl_teacher_student: float | None = None  # nats per masked position, T = 1
    seconds: float


class MlmSection(_Frozen):
    heldout: dict[str, Any]  # corpus fingerprint
    sequences: int
    tokens: int
    seq_len: int
    packing: str
    masking: dict[str, Any]
    results: list[MlmResult]
    top1_retention: dict[str, float | None]  # student -> % of the teacher's top-1 accuracy


# ----------------------------------------------------------------------------- size and speed


class SpeedResult(_Frozen):
    model: str
    latency_ms: Spread  # batch 1, per forward
    throughput: Spread  # sequences per second at the larger batch
    latency_speedup: float | None = None  # teacher latency / model latency
    throughput_speedup: float | None = None  # model throughput / teacher throughput


class SpeedSection(_Frozen):
    device: str
    torch_threads: int
    what: str  # what one timed call runs
    seq_len: int
    batch_size: int
    repeats: int
    warmup: int
    results: list[SpeedResult]


# ---------------------------------------------------------------------------------- downstream


class SeedScore(_Frozen):
    seed: int
    accuracy: float
    macro_f1: float
    steps: int
    train_seconds: float


class SweepPoint(_Frozen):
    """One (learning rate, epochs) a sweep tried: its scores on the tuning split, seeds averaged."""

    lr: float
    epochs: int
    accuracy: float
    macro_f1: float


class TaskModelResult(_Frozen):
    model: str
    seeds: list[SeedScore]
    accuracy: Spread
    macro_f1: Spread
    accuracy_retention: float | None = None  # % of the teacher's median
    macro_f1_retention: float | None = None
    # the rate and epochs this model was fine-tuned with (a sweep's choice, or the fixed recipe's),
    # and the epochs its schedule spans; None in reports made before they were recorded
    lr: float | None = None
    epochs: int | None = None
    schedule_epochs: int | None = None
    sweep: list[SweepPoint] = []  # every point of its sweep, when there was one
    # fine-tuned against the fine-tuned teacher's logits too: {"alpha": a, "temperature": T}
    task_distill: dict[str, float] | None = None


class TaskSplit(_Frozen):
    method: str
    seed: int
    dev_fraction: float
    examples: int
    train: int  # examples fine-tuned on (after --max-train-examples)
    dev: int  # examples scored (after --max-dev-examples)
    train_pool: int  # the train side of the split before the cap
    dev_pool: int
    train_indices_sha256: str
    dev_indices_sha256: str
    file: str  # splits/<task>.json, relative to the report directory
    tune: int | None = None  # a sweep's tuning split: this many of the `train` examples
    tune_indices_sha256: str | None = None
    transfer: int | None = None  # the task-distilled students' transfer set: examples after `train`
    transfer_indices_sha256: str | None = None
    augmented: int | None = None  # of them, augmented copies of the training examples (pipeline/augment.py)


class TaskSection(_Frozen):
    name: str
    spec: str
    fingerprint: dict[str, Any]
    text_column: str
    label_column: str
    labels: list[str]
    label_counts: dict[str, int]
    dropped_rows: int
    split: TaskSplit
    recipe: dict[str, Any]
    results: list[TaskModelResult]


class AblationRow(_Frozen):
    """The paper's Table 4: mean over tasks of the median accuracy, and its change."""

    model: str
    macro_accuracy: float
    delta_points: float | None = None  # vs the baseline student, in accuracy points (x100)
    # its standard error, paired over the same dev examples (metrics.paired_delta_se); None for
    # the teacher and the baseline, or where the parts predate stored predictions
    delta_se_points: float | None = None
    retention: float | None = None  # % of the teacher's macro accuracy


class Report(_Frozen):
    format: Literal["kdpipe-eval-report"] = REPORT_FORMAT
    format_version: Literal[1] = REPORT_VERSION
    created_at: str
    teacher: str
    students: list[str]
    baseline: str | None = None
    models: list[ModelEntry]
    mlm: MlmSection | None = None
    speed: SpeedSection | None = None
    tasks: list[TaskSection] = []
    ablation: list[AblationRow] = []
    plots: list[str] = []
    warnings: list[str] = []
    provenance: dict[str, Any]


# --------------------------------------------------------------------------- parts, settings


class Part(_Frozen):
    """One finished unit of work, written atomically under parts/ and never redone."""

    format: Literal["kdpipe-eval-part"] = PART_FORMAT
    format_version: Literal[1] = REPORT_VERSION
    kind: Literal["mlm", "speed", "task", "sweep", "soft", "augment"]
    key: str  # the file name without .json
    settings_sha256: str  # of eval.json's content: a part from other settings is never used
    data: dict[str, Any]


class EvalSettings(_Frozen):
    """eval.json: what the parts depend on. A rerun with any difference is refused."""

    format: Literal["kdpipe-eval-settings"] = SETTINGS_FORMAT
    format_version: Literal[1] = REPORT_VERSION
    settings: dict[str, Any]  # every option that changes a result
    inputs: dict[str, Any]  # models by weights hash, tasks and held-out text by content hash
