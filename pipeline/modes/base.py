"""What every target mode declares: the one interface the stages, loader and losses ask.

A target mode is what a cache stores for L_ce (pipeline/targets.py says why there are several).
Everything that depends on the mode is a method or attribute here, so no caller branches on a
mode's name: the shard columns and their Arrow types, the fingerprint and manifest fields, the
dump settings it refuses or fills in, the teacher-side reduction of the decoder inputs, the
loader's gathering of its columns into a batch, its L_ce, the training settings it cannot
serve, how `cache fidelity` makes and scores its targets, and its online baseline. Methods take
plain values (`TargetSettings`, numbers, arrays), never a stage's config, so this package
imports no stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

if TYPE_CHECKING:  # annotations only: the teacher and loader import this package
    from kdpipe.pipeline.shards import ShardData
    from kdpipe.pipeline.teacher import TeacherRunner

TeacherHead = tuple[torch.Tensor, torch.Tensor | None]  # exact mode: decoder weight (V, H'), bias (V,)
Made = dict[tuple[int, float], dict[str, np.ndarray]]  # (setting, T) -> target columns made by fidelity


@dataclass(frozen=True)
class TargetSettings:
    """The dump settings a mode may read, as a config or a manifest gives them; a mode ignores
    the ones it does not use."""

    top_k: int = 0
    temperatures: tuple[float, ...] = ()  # ascending
    samples: int = 0  # draws per position
    state_dim: int = 0  # width of the teacher decoder's input (H')

    @classmethod
    def of_manifest(cls, m: Any) -> TargetSettings:
        """The settings a cache's manifest (schemas.manifest.Manifest) records."""
        return cls(top_k=m.top_k, temperatures=tuple(m.temperatures), samples=m.samples or 0,
                   state_dim=m.state_dim or 0)


@dataclass(frozen=True)
class FidelityChunk:
    """One chunk of `kdpipe cache fidelity`'s sample, from which a mode makes its targets exactly
    as the dump would (pipeline/fidelity.py)."""

    z: torch.Tensor  # (C, V) the teacher's full float32 logits
    x: torch.Tensor  # (C, H') its decoder inputs, float32
    head: TeacherHead  # its decoder: weight (V, H'), bias (V,)
    temperatures: tuple[float, ...]  # ascending
    uniforms: dict[int, torch.Tensor | None]  # setting -> (C, N) the dump's random numbers here


@dataclass(frozen=True)
class FidelityCase:
    """A mode's L_ce at one (setting, temperature) on a chunk."""

    loss: Callable[[torch.Tensor], torch.Tensor]  # (C, V) student logits -> (C,) KL estimate (before T^2)
    columns: dict[str, torch.Tensor]  # the target columns the dump would store, for their bytes
    extra: float = 0.0  # the mode's detail (fidelity_extra), averaged over the chunk


class TargetMode:
    """Base of every mode: the defaults are those of a mode that stores no L_ce targets."""

    name: str = ""
    summary: str = ""  # what L_ce is made from, for the CLI help
    columns: tuple[str, ...] = ()  # the shard's target columns, in schema order
    uses_teacher: bool = True  # runs the teacher: stores the projected hidden state (L_cos)
    needs_head: bool = False  # stores the teacher's frozen decoder (head.safetensors)
    cpu_chunk_rows: int = 256  # decoder rows reduced at once on CPU (teacher.TeacherRunner)

    # ------------------------------------------------------------------------ dump settings

    def dump_defaults(self, data: dict[str, Any]) -> dict[str, Any]:
        """Fill in the dump settings this mode defaults differently (before validation)."""
        return data

    def dump_problems(self, *, temperatures: list[float], hidden_proj: str) -> list[str]:
        """Dump settings this mode refuses, each saying what to give instead."""
        return []

    def teacher_problems(self, *, top_k: int, vocab_size: int) -> list[str]:
        """Dump settings the teacher at hand cannot serve."""
        return []

    # ------------------------------------------------------------- schema, fingerprint, manifest

    def fields(self, ids: pa.DataType, k: int, n_temperatures: int, state_dim: int) -> list[pa.Field]:
        """The Arrow fields of `columns` (ids: the vocabulary's id type; schemas.shard adds them
        after the fields every mode has)."""
        return []

    column_meanings: dict[str, str] = {}  # what each of `columns` holds, for the dataset card

    def describe(self, targets: dict[str, Any], temperatures: list[float]) -> dict[str, Any]:
        """What a reader needs to decode the columns, from the fingerprint's targets section and
        its temperatures (pipeline/cache_card.py)."""
        return {}

    def fingerprint(self, s: TargetSettings) -> dict[str, Any]:
        """What the stored targets depend on besides the mode and position set."""
        return {}

    def manifest_fields(self, s: TargetSettings) -> dict[str, Any]:
        """The manifest's per-mode fields: top_k, temperatures, samples, state_dim."""
        return {"top_k": 0, "temperatures": [], "samples": None, "state_dim": None}

    # ---------------------------------------------------------------------------- teacher side

    def uniforms(self, seed: int, samples: int, rows: list[tuple[int, int, int, np.ndarray | None]]
                 ) -> torch.Tensor | None:
        """Random numbers the reduction needs, for rows (seq_id, view, length, target positions or
        None for every position); None when it needs none."""
        return None

    def reduce(self, runner: TeacherRunner, x: torch.Tensor, uniforms: torch.Tensor | None
               ) -> dict[str, torch.Tensor]:
        """The target columns (per target position, row-major; sample_len etc. included) from the
        (P, H') decoder inputs at the target positions, on the device (the runner copies them
        to the host, all at once)."""
        return {}

    # -------------------------------------------------------------------------------- loading

    def shard_problem(self, data: ShardData, s: TargetSettings) -> str | None:
        """What in a read shard's target columns contradicts the manifest's settings."""
        return None

    def takes(self, data: ShardData, tgt: np.ndarray, sample_offsets: np.ndarray | None,
              temperature_index: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Where this mode's batch columns come from at target rows `tgt` of a decoded row group:
        name -> (array, its rows to take); loader.collate takes them straight into the batch."""
        return {}

    def batch_tensors(self, pieces: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The batch's target tensors from the gathered pieces, concatenated over rows."""
        return {}

    # ---------------------------------------------------------------------------------- training

    def train_problems(self, *, alpha_ce: float, alpha_cos: float, temperature: float,
                       temperatures: tuple[float, ...]) -> list[str]:
        """Training settings this cache's targets cannot serve, each with what to do instead."""
        return []

    def ce(self, logits: torch.Tensor, batch: Any, rows: torch.Tensor | None, temperature: float,
           head: TeacherHead | None) -> torch.Tensor:
        """(P,) per-position L_ce (before T^2) from a loader.Batch; `rows` selects target rows
        when the batch holds targets at every position but the loss covers masked ones only."""
        raise ValueError(f"a cache of mode {self.name!r} holds no L_ce targets")

    # ------------------------------------------------------------------- fidelity (cache fidelity)

    stochastic: bool = False  # its L_ce is an estimate: the report gives its standard error
    fidelity_extra: str | None = None  # the report's name of FidelityCase.extra

    def fidelity_settings(self, ks: tuple[int, ...], samples: tuple[int, ...]) -> tuple[int, ...]:
        """The settings of this mode the report compares (k, N, or 0 for the one there is)."""
        return ()

    def fidelity_label(self, setting: int) -> str:
        return str(setting)

    def fidelity_detail(self, extra: float | None) -> str:
        return ""

    def fidelity_prepare(self, chunk: FidelityChunk, settings: tuple[int, ...]) -> Any:
        """Work shared by every (setting, temperature) of a chunk (e.g. one top-k at the largest k)."""
        return None

    def fidelity_case(self, chunk: FidelityChunk, prepared: Any, setting: int, ti: int,
                      entropy: torch.Tensor) -> FidelityCase:
        """L_ce at `setting` and temperature chunk.temperatures[ti]; entropy (C,) is H(p_T)."""
        raise ValueError(f"mode {self.name!r} holds no L_ce targets")

    def fidelity_check(self, stored: dict[str, np.ndarray], made: Made, s: TargetSettings
                       ) -> dict[str, Any] | None:
        """The cache's stored target columns at the sampled positions against the ones `made`
        here ((setting, T) -> columns, concatenated over chunks), where a setting matches the cache's."""
        return None

    def online(self, batch: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch's target fields recomputed from the teacher's float32 decoder inputs at its
        target positions (online.py's baseline)."""
        raise ValueError(f"mode {self.name!r} has no online baseline")


def pick(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return t if rows is None else t[rows]


def stored_tensor(x: np.ndarray) -> torch.Tensor:
    """A gathered (writable) array as a tensor in the dtype the shard stores it (float16 for most
    float targets), without a copy. `loader.Batch.to` widens float tensors to float32 on the device
    where they are used: half the bytes to pin and copy to an accelerator, and the host's loader
    threads spend nothing on widening (on a CPU it is a small part of a training step)."""
    return torch.from_numpy(x)
