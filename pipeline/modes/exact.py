"""exact: the teacher's decoder input and its frozen decoder (head.safetensors).

The full logits are recomputed in chunks at training time, so L_ce is the full-vocabulary KL
at any temperature (losses.exact_kl_from_state). The hidden state is kept unprojected.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from kdpipe.pipeline.losses import exact_kl_from_state
from kdpipe.pipeline.modes.base import (
    FidelityCase, FidelityChunk, Made, TargetMode, TargetSettings, TeacherHead, stored_tensor, pick,
)
from kdpipe.pipeline.teacher import TeacherRunner
from kdpipe.schemas.shard import vector_field


class Exact(TargetMode):
    name = "exact"
    summary = "the teacher's decoder input for exact full logits (exact)"
    columns = ("teacher_state",)
    needs_head = True

    def dump_defaults(self, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("hidden_proj") is None:
            data["hidden_proj"] = "identity"
        return data

    def dump_problems(self, *, temperatures: list[float], hidden_proj: str) -> list[str]:
        if hidden_proj != "identity":
            return ["exact targets keep the teacher's hidden state unprojected: use hidden_proj identity"]
        return []

    column_meanings = {
        "teacher_state": "the teacher decoder's input: logits = state @ W.T + b (head.safetensors)"}

    def fields(self, ids: pa.DataType, k: int, n_temperatures: int, state_dim: int) -> list[pa.Field]:
        return [vector_field("teacher_state", pa.float16(), state_dim)]

    def manifest_fields(self, s: TargetSettings) -> dict[str, Any]:
        return {"top_k": 0, "temperatures": [], "samples": None, "state_dim": s.state_dim}

    def reduce(self, runner: TeacherRunner, x: torch.Tensor, uniforms: torch.Tensor | None
               ) -> dict[str, torch.Tensor]:
        return {"teacher_state": x}  # (P, H')

    def takes(self, data: Any, tgt: np.ndarray, sample_offsets: np.ndarray | None,
              temperature_index: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {"teacher_state": (data.teacher_state, tgt)}

    def batch_tensors(self, pieces: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {"teacher_state": stored_tensor(pieces["teacher_state"])}  # (P, H')

    def ce(self, logits: torch.Tensor, batch: Any, rows: torch.Tensor | None, temperature: float,
           head: TeacherHead | None) -> torch.Tensor:
        return exact_kl_from_state(logits, pick(batch.teacher_state, rows), head, temperature)

    def fidelity_settings(self, ks: tuple[int, ...], samples: tuple[int, ...]) -> tuple[int, ...]:
        return (0,)  # one setting: the fp16 state

    def fidelity_label(self, setting: int) -> str:
        return "fp16 state"

    def fidelity_prepare(self, chunk: FidelityChunk, settings: tuple[int, ...]) -> Any:
        return chunk.x.half()  # (C, H') as the cache stores it

    def fidelity_case(self, chunk: FidelityChunk, prepared: Any, setting: int, ti: int,
                      entropy: torch.Tensor) -> FidelityCase:
        t = chunk.temperatures[ti]
        return FidelityCase(lambda zs: exact_kl_from_state(zs, prepared, chunk.head, t),
                            {"teacher_state": prepared})

    def fidelity_check(self, stored: dict[str, np.ndarray], made: Made, s: TargetSettings
                       ) -> dict[str, Any] | None:
        if not made:
            return None
        state = next(iter(made.values()))["teacher_state"].astype(np.float32)  # (P, H')
        diff = np.abs(state - stored["teacher_state"].astype(np.float32))
        return {"mode": self.name, "state_max_abs_diff": float(diff.max())}

    def online(self, batch: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"teacher_state": x}


MODE = Exact()
