"""sampled: N draws from the teacher's softened distribution at the one dump temperature.

Stored as distinct (token, count) pairs per target position; -sum_u (c_u / N) log q_u is an
unbiased estimate of the cross-entropy (losses.sampled_ce). Draws come from
`targets.position_uniforms`, a pure function of (seed, sequence, view, position).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from kdpipe.pipeline.losses import REFERENCE_TEMPERATURE, sampled_ce
from kdpipe.pipeline.modes.base import (
    FidelityCase, FidelityChunk, Made, TargetMode, TargetSettings, TeacherHead, pick,
)
from kdpipe.pipeline.offsets import ranges
from kdpipe.pipeline.targets import position_uniforms, sample_counts
from kdpipe.pipeline.teacher import TeacherRunner


class Sampled(TargetMode):
    name = "sampled"
    summary = "N draws from the softened teacher (sampled)"
    columns = ("sample_ids", "sample_counts")
    cpu_chunk_rows = 256  # its float64 CDFs are twice the size of topk's float32 logits

    def dump_defaults(self, data: dict[str, Any]) -> dict[str, Any]:
        if data.get("temperatures") is None:  # the reference's T
            data["temperatures"] = [REFERENCE_TEMPERATURE]
        return data

    def dump_problems(self, *, temperatures: list[float], hidden_proj: str) -> list[str]:
        if len(temperatures) != 1:
            return ["sampled targets are drawn at one temperature, fixed at dump time: give "
                    "one value in temperatures (e.g. --temperatures 2)"]
        return []

    def fields(self, ids: pa.DataType, k: int, n_temperatures: int, state_dim: int) -> list[pa.Field]:
        return [
            pa.field("sample_ids", pa.list_(pa.list_(ids)), nullable=False),
            pa.field("sample_counts", pa.list_(pa.list_(pa.uint16())), nullable=False),
        ]

    column_meanings = {"sample_ids": "distinct tokens drawn from the teacher's softened distribution",
                       "sample_counts": "how often each of sample_ids was drawn"}

    def describe(self, targets: dict[str, Any], temperatures: list[float]) -> dict[str, Any]:
        return {"temperature": (temperatures or [None])[0], "samples": targets.get("samples")}

    def fingerprint(self, s: TargetSettings) -> dict[str, Any]:
        return {"temperatures": list(s.temperatures), "samples": s.samples}

    def manifest_fields(self, s: TargetSettings) -> dict[str, Any]:
        return {"top_k": 0, "temperatures": list(s.temperatures), "samples": s.samples, "state_dim": None}

    def uniforms(self, seed: int, samples: int, rows: list[tuple[int, int, int, np.ndarray | None]]
                 ) -> torch.Tensor:
        """(P, N): position t of (seq, view) always gets row t of `position_uniforms(seed, seq,
        view)`, whatever batch or position set it is in."""
        out = []
        for seq_id, view, length, positions in rows:
            u = position_uniforms(seed, seq_id, view, length, samples)
            out.append(u if positions is None else u[positions])
        return torch.from_numpy(np.concatenate(out))

    def reduce(self, runner: TeacherRunner, x: torch.Tensor, uniforms: torch.Tensor | None
               ) -> dict[str, torch.Tensor]:
        """N draws per target position at the dump temperature, kept as distinct (id, count) pairs."""
        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        for i, z in runner.logit_chunks(x):  # (C, V)
            u = uniforms[i:i + z.shape[0]].to(z.device)
            ids, counts = sample_counts(z, runner.temperatures[0], u)  # (C, N), (C, N)
            keep = counts > 0
            parts["sample_ids"].append(ids[keep])
            parts["sample_counts"].append(counts[keep])
            parts["sample_len"].append(keep.sum(-1))
        return {name: torch.cat(ts) for name, ts in parts.items()}

    def takes(self, data: Any, tgt: np.ndarray, sample_offsets: np.ndarray | None,
              temperature_index: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        smp = ranges(sample_offsets[tgt], data.sample_len[tgt].astype(np.int64))  # the draws of those positions
        return {"sample_len": (data.sample_len, tgt), "sample_ids": (data.sample_ids, smp),
                "sample_counts": (data.sample_counts, smp)}

    def batch_tensors(self, pieces: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """(P, S) ids and counts, each position's distinct draws left-aligned, padding with count 0."""
        slen = pieces["sample_len"].astype(np.int64)
        width = int(slen.max()) if len(slen) else 0
        out_ids = np.zeros((len(slen), width), dtype=np.int64)
        out_counts = np.zeros((len(slen), width), dtype=np.int64)
        row = np.repeat(np.arange(len(slen)), slen)
        col = ranges(np.zeros(len(slen), dtype=np.int64), slen)
        out_ids[row, col] = pieces["sample_ids"]
        out_counts[row, col] = pieces["sample_counts"]
        return {"sample_ids": torch.from_numpy(out_ids), "sample_counts": torch.from_numpy(out_counts)}

    def train_problems(self, *, alpha_ce: float, alpha_cos: float, temperature: float,
                       temperatures: tuple[float, ...]) -> list[str]:
        if alpha_ce > 0 and not math.isclose(temperatures[0], temperature):
            grid = ", ".join(f"{t:g}" for t in temperatures)
            return [f"--temperature {temperature:g}: this cache's targets were drawn at T = {grid}, "
                    "fixed at dump time; train at that temperature, or dump another cache"]
        return []

    def ce(self, logits: torch.Tensor, batch: Any, rows: torch.Tensor | None, temperature: float,
           head: TeacherHead | None) -> torch.Tensor:
        return sampled_ce(logits, pick(batch.sample_ids, rows), pick(batch.sample_counts, rows), temperature)

    stochastic = True
    fidelity_extra = "distinct_draws"  # distinct tokens among the N draws

    def fidelity_settings(self, ks: tuple[int, ...], samples: tuple[int, ...]) -> tuple[int, ...]:
        return samples

    def fidelity_label(self, setting: int) -> str:
        return f"N={setting}"

    def fidelity_detail(self, extra: float | None) -> str:
        return f"{extra:.1f} distinct"

    def fidelity_case(self, chunk: FidelityChunk, prepared: Any, setting: int, ti: int,
                      entropy: torch.Tensor) -> FidelityCase:
        """N draws at T; L_ce = sampled_ce - H(p_T), so that it estimates the KL, not the CE."""
        t = chunk.temperatures[ti]
        # (C, N) ids with repeats, counts at their first occurrences
        sid, cnt = sample_counts(chunk.z, t, chunk.uniforms[setting])
        keep = cnt > 0
        return FidelityCase(lambda zs: sampled_ce(zs, sid, cnt, t) - entropy,
                            {"sample_ids": sid[keep], "sample_counts": cnt[keep], "sample_len": keep.sum(-1)},
                            keep.sum(-1).double().mean().item())

    def fidelity_check(self, stored: dict[str, np.ndarray], made: Made, s: TargetSettings
                       ) -> dict[str, Any] | None:
        t0 = f"{s.temperatures[0]:g}"
        cols = next((c for (n, t), c in made.items() if n == s.samples and f"{t:g}" == t0), None)
        if cols is None:
            return None
        same = all(np.array_equal(cols[c], stored[c]) for c in ("sample_len", "sample_ids", "sample_counts"))
        return {"mode": self.name, "samples": s.samples, "temperature": s.temperatures[0], "draws_equal": same}


MODE = Sampled()
