"""none: masked inputs and labels only, no teacher forward (MLM-only training, teacher-adapt)."""

from __future__ import annotations

from kdpipe.pipeline.modes.base import TargetMode


class NoTargets(TargetMode):
    name = "none"
    summary = "nothing (none: masked inputs and labels only)"
    uses_teacher = False

    def train_problems(self, *, alpha_ce: float, alpha_cos: float, temperature: float,
                       temperatures: tuple[float, ...]) -> list[str]:
        out = []
        if alpha_ce > 0:
            out.append("this cache holds no teacher targets (mode none, labels only): set alpha_ce to 0, "
                       "or dump a cache with --targets topk|sampled|exact")
        if alpha_cos > 0:
            out.append("this cache holds no teacher hidden states (mode none): set alpha_cos to 0")
        return out


MODE = NoTargets()
