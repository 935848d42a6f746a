"""topk: the teacher's k largest raw logits and log Z_T at each temperature of a grid.

The teacher's probabilities of the k tokens are exact at any T of the grid, and the tail mass
is known (losses.topk_kl coarse-grains both distributions to k tokens + one tail bucket).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from kdpipe.pipeline.losses import topk_kl
from kdpipe.pipeline.modes.base import (
    FidelityCase, FidelityChunk, Made, TargetMode, TargetSettings, TeacherHead, stored_tensor, pick,
)
from kdpipe.pipeline.teacher import TeacherRunner, reduce_logits
from kdpipe.schemas.shard import vector_field


class TopK(TargetMode):
    name = "topk"
    summary = "top-k logits + log-partition (topk)"
    columns = ("topk_ids", "topk_logits", "log_z")
    # 1024 x 30k float32 = 125 MB a chunk: large ops, few of them (teacher.TeacherRunner says why)
    cpu_chunk_rows = 1024

    def teacher_problems(self, *, top_k: int, vocab_size: int) -> list[str]:
        return [f"--top-k {top_k} is larger than the vocabulary ({vocab_size})"] if top_k > vocab_size else []

    def fields(self, ids: pa.DataType, k: int, n_temperatures: int, state_dim: int) -> list[pa.Field]:
        return [
            vector_field("topk_ids", ids, k),
            vector_field("topk_logits", pa.float16(), k),
            vector_field("log_z", pa.float32(), n_temperatures),
        ]

    column_meanings = {"topk_ids": "ids of the teacher's k largest logits, by falling logit",
                       "topk_logits": "raw logits (temperature 1) of topk_ids"}

    def describe(self, targets: dict[str, Any], temperatures: list[float]) -> dict[str, Any]:
        return {"k": targets.get("k"), "temperatures": temperatures,
                "topk_logits": "raw (temperature 1, not softened)",
                "log_z": "log sum_v exp(z_v / T) over the full vocabulary; column j is at temperatures[j]",
                "probability": "p_i = exp(topk_logits_i / T - log_z[T]); the tail mass is 1 - sum_i p_i"}

    def fingerprint(self, s: TargetSettings) -> dict[str, Any]:
        return {"k": s.top_k, "temperatures": list(s.temperatures)}

    def manifest_fields(self, s: TargetSettings) -> dict[str, Any]:
        return {"top_k": s.top_k, "temperatures": list(s.temperatures), "samples": None, "state_dim": None}

    def reduce(self, runner: TeacherRunner, x: torch.Tensor, uniforms: torch.Tensor | None
               ) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        for _, z in runner.logit_chunks(x):  # (C, V), overwritten by the next chunk
            for name, t in zip(self.columns, reduce_logits(z, runner.k, runner.temperatures)):
                parts[name].append(t)  # (C, k), (C, k), (C, n_T)
        return {name: torch.cat(ts) for name, ts in parts.items()}

    def shard_problem(self, data: Any, s: TargetSettings) -> str | None:
        if data.topk_ids.shape[1] != s.top_k:
            return "its top-k differs from the manifest's"
        if data.log_z.shape[1] != len(s.temperatures):
            return "its temperature grid differs from the manifest's"
        return None

    def takes(self, data: Any, tgt: np.ndarray, sample_offsets: np.ndarray | None,
              temperature_index: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {"topk_ids": (data.topk_ids, tgt), "topk_logits": (data.topk_logits, tgt),
                "log_z": (data.log_z[:, temperature_index], tgt)}

    def batch_tensors(self, pieces: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {"topk_ids": torch.from_numpy(pieces["topk_ids"].astype(np.int64)),  # (P, k)
                "topk_logits": stored_tensor(pieces["topk_logits"]),  # (P, k)
                "log_z": stored_tensor(pieces["log_z"])}  # (P,) at the chosen T

    def train_problems(self, *, alpha_ce: float, alpha_cos: float, temperature: float,
                       temperatures: tuple[float, ...]) -> list[str]:
        if alpha_ce > 0 and not any(math.isclose(t, temperature) for t in temperatures):
            grid = ", ".join(f"{t:g}" for t in temperatures)
            return [f"--temperature {temperature:g} is not in the cache's temperature grid ({grid}): "
                    "pick one of those, or dump a cache with it (an exact cache serves any temperature)"]
        return []

    def ce(self, logits: torch.Tensor, batch: Any, rows: torch.Tensor | None, temperature: float,
           head: TeacherHead | None) -> torch.Tensor:
        return topk_kl(logits, pick(batch.topk_ids, rows), pick(batch.topk_logits, rows),
                       pick(batch.log_z, rows), temperature)

    fidelity_extra = "teacher_topk_mass"  # the teacher's softened mass on its top-k

    def fidelity_settings(self, ks: tuple[int, ...], samples: tuple[int, ...]) -> tuple[int, ...]:
        return ks

    def fidelity_label(self, setting: int) -> str:
        return f"k={setting}"

    def fidelity_detail(self, extra: float | None) -> str:
        return f"top-k mass {100 * extra:.1f}%"

    def fidelity_prepare(self, chunk: FidelityChunk, settings: tuple[int, ...]) -> Any:
        """One reduction at the largest k (each smaller k is its prefix): ids, logits rounded to
        fp16 as stored, log Z fp32."""
        # (C, k), (C, k), (C, n_T)
        ids, vals, log_z = reduce_logits(chunk.z.clone(), max(settings), chunk.temperatures)
        return ids, vals.half().float(), log_z

    def fidelity_case(self, chunk: FidelityChunk, prepared: Any, setting: int, ti: int,
                      entropy: torch.Tensor) -> FidelityCase:
        ids, vals16, log_z = prepared
        t = chunk.temperatures[ti]
        idk, vk, lz = ids[:, :setting], vals16[:, :setting], log_z[:, ti]
        mass = (vk / t - lz[:, None]).exp().sum(-1).clamp(max=1).mean().item()
        return FidelityCase(lambda zs: topk_kl(zs, idk, vk, lz, t),
                            {"topk_ids": idk, "topk_logits": vk, "log_z": log_z}, mass)

    def fidelity_check(self, stored: dict[str, np.ndarray], made: Made, s: TargetSettings
                       ) -> dict[str, Any] | None:
        if not made:
            return None
        kmax = max(k for k, _ in made)
        if kmax < s.top_k:
            return None
        cols = next(c for (k, _), c in made.items() if k == kmax)
        ids, vals = cols["topk_ids"][:, :s.top_k], cols["topk_logits"][:, :s.top_k]
        return {"mode": self.name, "k": s.top_k, "ids_equal": float((ids == stored["topk_ids"]).mean()),
                "logits_max_abs_diff": float(np.abs(vals - stored["topk_logits"].astype(np.float32)).max())}


MODE = TopK()
