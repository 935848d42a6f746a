"""Online distillation targets: the reference method, the teacher run at every student step.

kdpipe never trains this way; it is the baseline a cache is measured against (bench/quality.py,
tests/test_target_modes.py). Given the batches of an exact cache, the teacher recomputes in
float32 what that cache stores in fp16 (its last hidden state and its decoder input), so a
student trained with these targets differs from the exact-mode student only by that rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import torch

from kdpipe.pipeline.loader import Batch
from kdpipe.pipeline.modes import get_mode
from kdpipe.pipeline.teacher import TeacherRunner


def online_targets(model: torch.nn.Module, device: torch.device,
                   positions: Literal["all", "masked"], targets: str = "exact") -> Callable[[Batch], Batch]:
    """A function replacing a batch's hidden (N, H) and its target mode's fields (exact:
    teacher_state (P, H')) with the teacher's float32 values computed now from the batch's masked
    input ids; `positions` is the cache's target positions (P = N, or the M masked ones in
    mlm_index order). A batch's hidden_layers and relation (layer-wise and relation targets,
    pipeline/layer_targets.py, relation_targets.py) stay as the cache stores them: the baseline is
    the reference's, which has neither loss."""
    mode = get_mode(targets)
    runner = TeacherRunner(model, 1, (1.0,), torch.eye(int(model.config.hidden_size)), device, mode=targets)

    def replace(batch: Batch) -> Batch:
        h, x = runner.hidden_and_decoder_input(batch.input_ids, batch.attention_mask)  # (N, H), (N, H')
        state = x if positions == "all" else x[batch.mlm_index.to(x.device)]  # (P, H')
        # clones made outside inference mode: autograd may save them for the student's backward
        return dataclasses.replace(batch, hidden=h.clone(), **mode.online(batch, state.clone()))

    return replace
