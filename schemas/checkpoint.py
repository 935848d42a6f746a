"""The on-disk formats of a student run: run.json and each checkpoint's checkpoint.json.
run.json version 1; checkpoint.json version 2 (version 1 held the student in student.safetensors,
without a config, and counted the number of steps among the settings a resume must repeat).

    RUN_DIR/
      run.json                       RunRecord: the cache it trains from, the resolved config
      metrics.jsonl                  one line per logging step (see METRIC_KEYS)
      samples.jsonl                  with --record-samples: the (seq_id, view) rows of each step
      checkpoints/step-NNNNNNN/      one checkpoint, renamed into place when complete; also a
                                     save_pretrained folder (from_pretrained loads it):
        config.json, model.safetensors the student (tied tensors stored once)
        tokenizer.json, ...            its tokenizer, where the run knows one
        hidden_map.safetensors         the map of student hidden states into the cache's space
        optimizer.pt                   AdamW state (torch.save; read back with weights_only=True)
        rng.safetensors                torch CPU (and CUDA) generator states
        checkpoint.json                CheckpointMeta, written last, with the SHA-256 of the others
                                       (and, in fp16, the loss scaler's state)
      checkpoints/latest             name of the newest complete checkpoint, written atomically
      final/                         save_pretrained student (+ tokenizer), loadable without kdpipe

Nothing here is pickle except optimizer.pt, which is only ever read with weights_only=True.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

RUN_FORMAT = "kdpipe-run"
RUN_VERSION = 1
RUN_NAME = "run.json"
CHECKPOINT_FORMAT = "kdpipe-checkpoint"
CHECKPOINT_VERSION = 2
CHECKPOINT_META = "checkpoint.json"
CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest"
FINAL_DIR = "final"
STUDENT_RECORD_NAME = "kdpipe_student.json"  # in final/, written last: what run and cache made it
METRICS_NAME = "metrics.jsonl"
SAMPLES_NAME = "samples.jsonl"
CHECKPOINT_PATTERN = r"^step-(\d{7})$"
CHECKPOINT_NAME = "step-{step:07d}"  # a checkpoint's folder under checkpoints/
STUDENT_FILE = "model.safetensors"  # a checkpoint's files: the student as save_pretrained names it
HIDDEN_MAP_FILE = "hidden_map.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.safetensors"
FINAL_HIDDEN_MAP_NAME = "kdpipe_hidden_map.safetensors"  # in final/, beside the model
TENSORBOARD_DIR = "tensorboard"


def checkpoint_name(step: int) -> str:
    return CHECKPOINT_NAME.format(step=step)

# What the eval stage plots: keep these names.
METRIC_KEYS = ("step", "loss", "loss_ce", "loss_mlm", "loss_cos", "lr", "tokens_per_s", "epoch")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunRecord(_Frozen):
    format: Literal["kdpipe-run"] = RUN_FORMAT
    format_version: Literal[1] = RUN_VERSION
    run_id: str
    cache: str  # the path it was started with; the fingerprint hash is what must match
    cache_fingerprint_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    config: dict[str, Any]  # every setting, resolved
    identity: dict[str, Any]  # the settings a resume must repeat (the others are operational)
    student_config: dict[str, Any]
    init: dict[str, Any]  # what a teacher initialisation copied
    total_steps: int = Field(ge=1)  # the run's length now (see length_changes)
    length_changes: list[dict[str, Any]] = []  # each rerun that changed it: at_step, from/to total_steps
    created_at: str
    versions: dict[str, str]
    code_revision: str


class Position(_Frozen):
    """The data position: rows of epoch `epoch`'s order already consumed (an exhausted epoch is
    (epoch + 1, 0)); the loader resumes from it (pipeline/loader.py), a checkpoint saves it."""

    epoch: int = Field(ge=0)
    index: int = Field(ge=0)

    def __init__(self, epoch: int, index: int) -> None:  # Position(1, 0) as well as by name
        super().__init__(epoch=epoch, index=index)


class CheckpointMeta(_Frozen):
    format: Literal["kdpipe-checkpoint"] = CHECKPOINT_FORMAT
    format_version: Literal[2] = CHECKPOINT_VERSION
    run_id: str
    step: int = Field(ge=1)
    position: Position
    cache_fingerprint_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    identity_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    python_rng: list[Any]  # random.getstate() as JSON
    numpy_rng: list[Any]  # numpy.random.get_state() as JSON
    log_window: dict[str, float]  # metric sums since the last logged step
    files: dict[str, str]  # file name -> SHA-256
    created_at: str
    grad_scaler: dict[str, Any] | None = None  # fp16: torch.amp.GradScaler.state_dict() (plain numbers)
