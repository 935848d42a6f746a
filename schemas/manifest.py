"""The cache manifest (manifest.json): the commit point of a cache, written last.

Readers trust only what it lists. Version 1. Validated on read, so a hand-edited or damaged
manifest is refused with the field that is wrong.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kdpipe.pipeline.modes import DEFAULT_MODE, MODE_NAMES
from kdpipe.schemas.shard import SHARDS_DIR  # noqa: F401  (a cache's folders and files, all here)

MANIFEST_FORMAT = "kdpipe-cache"
MANIFEST_VERSION = 1
# A cache directory's files (pipeline/cache.py draws the layout):
MANIFEST_NAME = "manifest.json"
FINGERPRINT_NAME = "fingerprint.json"  # written first: guards a half-made cache against other settings
RUN_INFO_NAME = "run_info.json"
TEACHER_CONFIG_NAME = "teacher_config.json"
PROJECTION_NAME = "projection.safetensors"
HEAD_NAME = "head.safetensors"
TOKENIZER_DIR = "tokenizer"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardEntry(_Frozen):
    path: str  # relative to the cache directory
    index: int = Field(ge=0)
    first_seq: int = Field(ge=0)
    num_seqs: int = Field(ge=0)
    rows: int = Field(ge=0)
    tokens: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class FileEntry(_Frozen):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class RelationEntry(_Frozen):
    """The relation targets of a cache (pipeline/relation_targets.py): which teacher layer's
    attention projections the `relation` column holds, and what each choice of parts costs."""

    layer: int = Field(ge=1)  # teacher layer L (its output is hidden_states[L])
    parts: str  # of "qkv", in that order
    dim: int = Field(ge=1)  # entries per part (the projection's width)
    heads: int = Field(ge=1)  # the teacher's attention heads: --relation-heads' default
    raw_bytes_per_token: int  # float16 before compression: 2 * dim * len(parts)
    raw_bytes_per_token_by_parts: dict[str, int]  # the same for every choice of --relation-parts

    @property
    def width(self) -> int:
        return self.dim * len(self.parts)


class Manifest(_Frozen):
    format: Literal["kdpipe-cache"] = MANIFEST_FORMAT
    format_version: Literal[1] = MANIFEST_VERSION
    schema_version: int
    fingerprint: dict[str, Any]
    fingerprint_sha256: str
    vocab_size: int
    seq_len: int
    targets: Literal[MODE_NAMES] = DEFAULT_MODE  # type: ignore[valid-type]  # pipeline/modes
    target_positions: Literal["all", "masked"] = "all"
    # top_k, temperatures, samples and state_dim are the mode's own (TargetMode.manifest_fields)
    top_k: int  # topk mode; 0 otherwise
    temperatures: list[float]  # topk: the grid; sampled: the one draw temperature; else []
    samples: int | None = None  # sampled: draws per position
    hidden_dim: int  # 0 in mode none
    hidden_layers: list[int] = []  # other layers stored in the hidden_layers column (pipeline/layer_targets.py)
    relation: RelationEntry | None = None  # with --relation-layer (pipeline/relation_targets.py)
    state_dim: int | None = None  # exact: width of teacher_state
    projection: FileEntry | None = None  # absent in mode none
    head: FileEntry | None = None  # exact: the frozen decoder (head.safetensors)
    teacher_config: FileEntry
    tokenizer: list[FileEntry] = []  # the teacher's tokenizer files, under tokenizer/
    shards: list[ShardEntry]
    sequences: int
    rows: int
    tokens: int
    bytes: int
    bytes_per_token: float
    bytes_per_token_by_column: dict[str, float]
    created_at: str
    finished_at: str
