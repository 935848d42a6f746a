"""One optimizer update of student-train, in one process or as one rank of a DDP job.

The stage (stages/student_train.py) owns the story: set up, claim the run directory, loop,
checkpoint, finish. This module owns what a loop iteration does: the student, its hidden map and
AdamW built in a fixed order (so a seed gives the same run), one update over `grad_accum`
batches with the DistilBERT triple loss, and the metrics line that summarises the updates since
the last one.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdpipe.pipeline import distributed, layer_targets, relation_targets
from kdpipe.pipeline import student as stu
from kdpipe.pipeline.compiling import Compile, compiled
from kdpipe.pipeline.device import MIN_LOSS_SCALE, autocast, grad_scaler
from kdpipe.pipeline.errors import KdpipeError
from kdpipe.pipeline.fsutil import atomic_write_bytes
from kdpipe.pipeline.loader import Batch
from kdpipe.pipeline.losses import LossSpec, distillation_loss
from kdpipe.pipeline.modes import TeacherHead

REFERENCE_NO_DECAY = ("bias", "LayerNorm.weight")  # parameters the DistilBERT reference never decays
# the metrics window, saved in checkpoints; skipped: fp16 updates the loss scaler skipped (overflow)
WINDOW_KEYS = ("steps", "loss", "ce", "mlm", "cos", "layer_cos", "relation", "grad_norm", "skipped")
TERMS = ("ce", "mlm", "cos", "layer_cos", "relation")  # the loss terms, each weighted by spec.alpha_<term>
_DROPOUT_SALT = 0xD209


class NonFiniteError(KdpipeError):
    """A loss term or the gradient of an update is not finite. Raised before the optimizer steps,
    so the weights, the optimizer state and every checkpoint still hold the last good update."""

    def __init__(self, what: str, terms: dict[str, float]) -> None:
        self.what, self.terms = what, terms
        shown = ", ".join(f"{k} {v:.4g}" for k, v in terms.items())
        super().__init__(f"{what} ({shown})" if shown else what)


def check_terms(terms: dict[str, float]) -> None:
    """Refuse an update whose loss terms (already on the host) are not all finite."""
    for key in (*TERMS, "loss"):
        if key in terms and not math.isfinite(terms[key]):
            raise NonFiniteError(f"the {key} loss is {terms[key]}", terms)


@dataclass(frozen=True)
class Optim:
    """AdamW and the update around it."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    max_grad_norm: float  # 0: no clipping
    grad_accum: int


@dataclass
class Trainer:
    student: torch.nn.Module
    hidden_map: torch.nn.Module
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    init_report: dict[str, Any]
    ddp: torch.nn.Module | None = None  # several ranks: DistributedDataParallel(DistilStep)
    precision: str | None = None  # of the forward's autocast (None: the stage's, pipeline/device.py)
    scaler: torch.amp.GradScaler | None = None  # fp16: the loss scaler
    # what runs the student's body and MLM head (build_trainer's): the modules themselves, or
    # torch.compile's wrappers of them (sharing their parameters: `student` and its state_dict stay plain)
    body: Any = None
    head: Any = None
    relation: Any = None  # with L_rel: the student's matched layer's projections (relation_targets.LayerParts)


def build_trainer(student_config: Any, teacher_hidden: int, projection: torch.Tensor, optim: Optim,
                  seed: int, init: str, layer_map: list[int] | None,
                  teacher_state: dict[str, torch.Tensor] | None, device: torch.device,
                  init_from: Path | None = None, layer_projections: list[torch.Tensor] | None = None,
                  precision: str = "auto", compile_spec: Compile | None = None,
                  relation: tuple[int, str] | None = None) -> Trainer:
    """Student (seeded), its initialisation (teacher layers, or a model folder's weights), the
    hidden map (with L_layer, one more map per matched layer: `layer_projections`, each (H, d))
    and AdamW, in a fixed order; the loss scaler of fp16, the compiled forward. relation (with
    L_rel): (the student's matched block, 0-based; the cache's parts)."""
    model = stu.build_student(student_config, seed)
    report: dict[str, Any] = {"init": init}
    if teacher_state is not None:
        report.update(stu.init_from_teacher(model, teacher_state, layer_map).summary())
    hmap = stu.hidden_map(int(student_config.hidden_size), teacher_hidden, projection)
    if layer_projections:
        hmap = layer_targets.with_layer_maps(hmap, int(student_config.hidden_size), teacher_hidden,
                                             layer_projections)
    if init_from is not None:
        report.update(stu.init_from_folder(model, hmap, init_from))
    model.to(device).train()
    hmap.to(device).train()
    decay, no_decay = [], []
    for name, p in [*model.named_parameters(), *(("hidden_map." + n, p) for n, p in hmap.named_parameters())]:
        (no_decay if any(nd in name for nd in REFERENCE_NO_DECAY) else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": optim.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
    return Trainer(model, hmap, opt, decay + no_decay, report, precision=precision,
                   scaler=grad_scaler(device, precision),
                   body=compiled(stu.body(model), compile_spec), head=compiled(stu.mlm_head(model), compile_spec),
                   relation=None if relation is None else relation_targets.LayerParts(model, *relation))


class DistilStep(torch.nn.Module):
    """The student and hidden map as one module whose forward is a rank's weighted loss, so DDP
    (which must see the forward) averages the gradients of both.

    The losses are means over the batch's positions (ce over P, mlm over the M masked, cos over
    the N non-padding ones). A rank's term is weighted by local count / global count, so the terms
    summed over ranks are the global batch's means, and the backward loss is that times the world
    size, so DDP's average of the gradients is the one-process gradient of the global batch."""

    def __init__(self, student: torch.nn.Module, hidden_map: torch.nn.Module, spec: LossSpec,
                 teacher_head: TeacherHead | None, world_size: int, body: Any, head: Any,
                 relation: Any = None) -> None:
        super().__init__()
        self.student, self.hidden_map = student, hidden_map
        self.spec, self.teacher_head, self.world_size = spec, teacher_head, world_size
        self.forward_fns = (body, head)  # a tuple: not registered as submodules (no state_dict keys)
        self.relation = relation  # a plain object over the student's own modules

    def forward(self, batch: Batch) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """(loss for backward, [ce, mlm, cos, layer_cos, relation] shares of the global means, None
        where alpha is 0)."""
        spec, part = self.spec, batch.part
        terms = distillation_loss(*self.forward_fns, self.hidden_map, batch, spec, self.teacher_head, self.relation)
        n_local, m_local = batch.tokens, int(batch.mlm_index.numel())
        p_local, p_global = (m_local, part.global_masked) if spec.ce_masked_only else (n_local, part.global_tokens)

        def share(local: int, total: int) -> float:
            return local / total if part.rows and total else 0.0

        shares = [t * share(lo, tot) if t is not None else None
                  for t, lo, tot in ((terms.ce, p_local, p_global), (terms.mlm, m_local, part.global_masked),
                                     (terms.cos, n_local, part.global_tokens),
                                     (terms.layer_cos, n_local, part.global_tokens),
                                     (terms.relation, n_local, part.global_tokens))]
        loss = sum(a * t for a, t in zip(alphas(spec), shares) if t is not None)
        return loss * self.world_size, shares


def alphas(spec: LossSpec) -> tuple[float, ...]:
    """The weight of each of TERMS."""
    return tuple(getattr(spec, f"alpha_{k}") for k in TERMS)


def wrap_ddp(tr: Trainer, spec: LossSpec, teacher_head: TeacherHead | None, w: distributed.World) -> None:
    """DDP over the student and hidden map (several ranks). Construction broadcasts rank 0's
    weights, so the other ranks need not read the teacher. Parameters may go unused in a step (so
    DDP must look for them, an extra graph traversal) where a loss runs only on masked positions
    and a rank's share has none, or a weight of 0 leaves the head or the hidden map out."""
    module = DistilStep(tr.student, tr.hidden_map, spec, teacher_head, w.size, tr.body, tr.head, tr.relation)
    unused = spec.ce_masked_only or spec.alpha_ce == 0 or spec.alpha_cos == 0
    tr.ddp = torch.nn.parallel.DistributedDataParallel(module, device_ids=None, find_unused_parameters=unused)


@dataclass
class StepResult:
    batches: int  # micro-batches consumed (0: the data is exhausted)
    last: Batch | None
    sums: dict[str, float]  # loss terms, averaged over the accumulation as the gradient is
    tokens: int
    rows: list[list[int]]  # (seq_id, view) of every row, in order
    waited: float  # seconds spent waiting for batches


def _new_result() -> StepResult:
    return StepResult(0, None, {k: 0.0 for k in ("loss", *TERMS, "grad_norm", "skipped")}, 0, [], 0.0)


def _backward(tr: Trainer, loss: torch.Tensor) -> None:
    """Backward of the loss, scaled by the loss scaler in fp16."""
    (tr.scaler.scale(loss) if tr.scaler is not None else loss).backward()


def _update(tr: Trainer, optim: Optim, terms: dict[str, float]) -> tuple[float, bool]:
    """Clip (where asked) and step. Returns the gradients' total L2 norm before clipping (as
    transformers' Trainer logs it), and whether the update was skipped.

    Without a loss scaler a non-finite gradient norm stops training and changes nothing (with
    several ranks the gradients are averaged already, so every rank refuses the same update).
    With one (fp16) the gradients are unscaled before the norm and the clipping; a non-finite norm
    is an overflow of the scaled gradients, normal in fp16: the scaler skips the update and halves
    its scale. Only an overflow at a scale of MIN_LOSS_SCALE or less, which no smaller scale undoes,
    stops training (so a run whose gradients stay non-finite stops within about 17 updates)."""
    if tr.scaler is not None:
        tr.scaler.unscale_(tr.optimizer)
    if optim.max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(tr.params, optim.max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in tr.params if p.grad is not None])
    finite = math.isfinite(float(norm))
    if tr.scaler is None:
        if not finite:
            raise NonFiniteError(f"the gradient norm is {float(norm)}", terms)
        tr.optimizer.step()
        return float(norm), False
    if not finite and tr.scaler.get_scale() <= MIN_LOSS_SCALE:
        raise NonFiniteError(f"the gradient norm is {float(norm)} at an fp16 loss scale of "
                             f"{tr.scaler.get_scale():g} (the gradients overflow float16 unscaled)", terms)
    tr.scaler.step(tr.optimizer)  # skips the update when the gradients hold an inf or a NaN
    tr.scaler.update()
    return float(norm), not finite


def _record_update(res: StepResult, norm: float, skipped: bool) -> None:
    """An update's grad norm (a skipped one has none) and skip count, into the step's sums."""
    res.sums["grad_norm"] = 0.0 if skipped else norm
    res.sums["skipped"] = float(skipped)


def _start(tr: Trainer, lr: float) -> None:
    for g in tr.optimizer.param_groups:
        g["lr"] = lr
    tr.optimizer.zero_grad(set_to_none=True)


def train_step(tr: Trainer, batches: Iterator[Batch], spec: LossSpec, teacher_head: TeacherHead | None,
               optim: Optim, lr: float, device: torch.device, record_rows: bool) -> StepResult:
    """One optimizer update over `grad_accum` batches: forward, the losses, backward, clip, AdamW."""
    _start(tr, lr)
    res = _new_result()
    for _ in range(optim.grad_accum):
        t0 = time.perf_counter()
        batch = next(batches, None)
        res.waited += time.perf_counter() - t0
        if batch is None:
            break
        batch = batch.to(device)
        with autocast(device, tr.precision):
            terms = distillation_loss(tr.body, tr.head, tr.hidden_map, batch, spec, teacher_head, tr.relation)
        _backward(tr, terms.loss / optim.grad_accum)
        res.batches, res.last, res.tokens = res.batches + 1, batch, res.tokens + batch.tokens
        for key in ("loss", *TERMS):
            if (t := getattr(terms, key)) is not None:
                res.sums[key] += t.item() / optim.grad_accum
        if record_rows:
            res.rows += [[int(a), int(b)] for a, b in zip(batch.seq_id, batch.view)]
    if res.batches:
        terms = {k: res.sums[k] for k in ("loss", *TERMS) if k == "loss" or getattr(spec, f"alpha_{k}") > 0}
        check_terms(terms)
        _record_update(res, *_update(tr, optim, terms))
    return res


def train_step_ddp(tr: Trainer, batches: Iterator[Batch], optim: Optim, lr: float, device: torch.device,
                   record_rows: bool, w: distributed.World, seed: int, step: int) -> StepResult:
    """train_step with several ranks: each rank's share of the same global batches, gradients
    synchronised on the last micro-batch only (no_sync before), loss terms and tokens summed over
    ranks. Dropout is drawn from a generator reseeded at every update from (seed, step, rank), so
    no RNG state has to travel in a checkpoint: a resume on the same world size is exact, and on
    another one still deterministic."""
    spec = tr.ddp.module.spec
    _start(tr, lr)
    res = _new_result()
    t0 = time.perf_counter()
    micro = list(itertools.islice(batches, optim.grad_accum))  # every rank gets as many: same stream
    res.waited = time.perf_counter() - t0
    torch.manual_seed(int(np.random.SeedSequence([seed, step, w.rank, _DROPOUT_SALT]).generate_state(1)[0]))
    local = [0.0] * (len(TERMS) + 1)  # shares of the global means of TERMS; tokens
    for i, batch in enumerate(micro):
        batch = batch.to(device)
        with nullcontext() if i == len(micro) - 1 else tr.ddp.no_sync():
            with autocast(device, tr.precision):
                loss, shares = tr.ddp(batch)
            _backward(tr, loss / optim.grad_accum)
        for j, t in enumerate(shares):
            if t is not None:
                local[j] += t.item() / optim.grad_accum
        local[-1] += batch.tokens if batch.part.rows else 0
        if record_rows:
            res.rows += [[int(a), int(b)] for a, b in zip(batch.part.seq_id, batch.part.view)]
    res.batches, res.last = len(micro), (micro[-1] if micro else None)
    if res.batches:  # a rank's own terms; a non-finite one makes every rank's gradient non-finite
        _record_update(res, *_update(tr, optim, {k: v for k, v, a in zip(TERMS, local, alphas(spec)) if a > 0}))
    *summed, tokens = distributed.all_reduce_sum(w, local)
    for key, v, alpha in zip(TERMS, summed, alphas(spec)):
        if alpha > 0:
            res.sums[key] = v
            res.sums["loss"] += alpha * v
    res.tokens = int(round(tokens))
    return res


# ------------------------------------------------------------------------------------ metrics

def metrics_line(step: int, w: dict[str, float], lr: float, elapsed: float, waited: float, timed_steps: int,
                 timed_tokens: int, epoch: float, spec: LossSpec, loss_scale: float | None = None
                 ) -> dict[str, Any]:
    """Means over the updates since the last line; the timings (tokens_per_s, steps_per_s,
    data_wait_pct: time spent waiting for a batch, % of wall time) are this process's; with
    several ranks the tokens are the whole job's. grad_norm: the mean over the window of each
    update's gradient norm before clipping (None when fp16 skipped every update of the window).
    In fp16 (`loss_scale` given) also the scale now and the updates skipped in the window."""
    n = max(w["steps"], 1.0)
    skipped = w.get("skipped", 0.0)
    term = lambda key, alpha: (w[key] / n) if alpha > 0 else None  # noqa: E731
    layer = {"loss_layer_cos": term("layer_cos", spec.alpha_layer_cos)} if spec.alpha_layer_cos > 0 else {}
    if spec.alpha_relation > 0:
        layer["loss_relation"] = term("relation", spec.alpha_relation)
    line = {"step": step, "loss": w["loss"] / n, "loss_ce": term("ce", spec.alpha_ce),
            "loss_mlm": term("mlm", spec.alpha_mlm), "loss_cos": term("cos", spec.alpha_cos), **layer,
            "grad_norm": w["grad_norm"] / (w["steps"] - skipped) if w["steps"] > skipped else None,
            "lr": lr, "tokens_per_s": round(timed_tokens / max(elapsed, 1e-9), 1),
            "epoch": round(epoch, 4), "steps_per_s": round(timed_steps / max(elapsed, 1e-9), 4),
            "data_wait_pct": round(100 * waited / max(elapsed, 1e-9), 2)}
    if loss_scale is not None:
        line.update(loss_scale=loss_scale, skipped_updates=int(skipped))
    return line


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of steps <= last_step (and drop a torn last line), atomically: a resumed
    run's metrics and samples files equal an uninterrupted run's."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= last_step:
            keep.append(line + "\n")
    atomic_write_bytes(path, "".join(keep).encode())
