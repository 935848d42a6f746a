"""How faithful each target mode's L_ce is, measured on real positions of a cache.

    kdpipe cache fidelity caches/wiki --teacher ./bert-mlm --positions 2000 \
        --k 8,32,128 --samples 8,32,128 --temperatures 1,2,4 --out fidelity.json

On a seeded sample of the cache's rows (their masked inputs, as the teacher saw them) and at the
cache's target positions (every token, or the masked ones), the teacher gives full float32 logits
and a student gives its own (by default the DistilBERT-init student: half the teacher's layers,
copied from it, and its embeddings and head). Each mode's target is then made exactly as
teacher-dump makes it and stores it:

- topk k: `teacher.reduce_logits` (ids, raw logits stored fp16, log Z fp32 over the full
  vocabulary), L_ce = `losses.topk_kl` (k tokens + the tail bucket);
- sampled N: N inverse-CDF draws at T from `targets.position_uniforms` seeded as the dump seeds
  them (the cache's seed, sequence, view, position), L_ce = `losses.sampled_ce` - H(p_T), so that
  it estimates the KL and not the cross-entropy;
- exact: the decoder input stored fp16, L_ce = `losses.exact_kl_from_state`.

Each is compared with the exact full-vocabulary KL(p_T || q_T) computed in float64 from the
float32 teacher logits: the relative error of the mean L_ce (signed; with its standard error over
positions), and, per position, the cosine, angle and norm ratio of its gradient w.r.t. the
student logits against the exact gradient (`targets.gradient_fidelity`). Bytes per token of each
target column are measured by writing the sampled rows' column with the shard writer and the
cache's zstd level (`shards.write_shard`: plain, no dictionary), divided by the
rows' tokens. Where the cache itself holds one of the settings, its stored targets are compared
with the recomputed ones (`cache_check`): the draws and top-k the report simulates are the dump's.
"""

from __future__ import annotations

import math
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from kdpipe.pipeline import student as stu
from kdpipe.pipeline.cache import load_manifest, open_shard
from kdpipe.pipeline.config import MAX_SEED
from kdpipe.pipeline.device import pick_device
from kdpipe.pipeline.errors import CacheMismatchError, KdpipeError
from kdpipe.pipeline.modes import MODE_NAMES, MODES, TargetSettings, get_mode
from kdpipe.pipeline.modes.base import FidelityChunk
from kdpipe.pipeline.padding import pad
from kdpipe.pipeline.shards import PER_SAMPLE, ShardData, column_bytes, from_table, to_table, write_shard
from kdpipe.pipeline.targets import gradient_fidelity
from kdpipe.pipeline.teacher import TeacherRunner, load_teacher, resolve_model_path, weights_sha256
from kdpipe.schemas.manifest import Manifest
from kdpipe.schemas.shard import shard_schema


@dataclass(frozen=True)
class FidelitySpec:
    positions: int = 2000  # target positions to evaluate (whole rows are taken: a few more)
    ks: tuple[int, ...] = (8, 32, 128)
    samples: tuple[int, ...] = (8, 32, 128)
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0)
    seed: int = 0  # which rows are sampled
    chunk: int = 256  # positions whose (C, V) logits exist at once
    batch_size: int = 16  # rows per teacher / student forward
    device: str = "auto"

    def problems(self, vocab_size: int) -> list[str]:
        out = []
        if self.positions < 1:
            out.append("--positions must be at least 1")
        if not 0 <= self.seed <= MAX_SEED:
            out.append(f"--seed must lie in 0..{MAX_SEED}")
        if not self.ks and not self.samples:
            out.append("nothing to compare: give --k and/or --samples")
        if any(k < 1 or k > vocab_size for k in self.ks):
            out.append(f"--k values must lie in 1..{vocab_size} (the vocabulary)")
        if any(n < 1 or n > 65535 for n in self.samples):
            out.append("--samples values must lie in 1..65535")
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            out.append("--temperatures must be positive")
        if len(set(self.temperatures)) != len(self.temperatures):
            out.append("--temperatures must be distinct")
        return out


@dataclass
class Rows:
    """The sampled rows: a ShardData of those rows (in sample order), and their target positions."""

    data: ShardData
    targets: list[np.ndarray]  # per row, positions within the row that hold targets
    stored: dict[str, np.ndarray] = field(default_factory=dict)  # the cache's own target columns

    @property
    def n_targets(self) -> int:
        return int(sum(len(t) for t in self.targets))


# --------------------------------------------------------------------------------- the sample

def _targets_of(data: ShardData, r: int, positions: str) -> np.ndarray:
    if positions == "masked":
        mo = data.mlm_offsets()
        return data.mlm_positions[mo[r]:mo[r + 1]].astype(np.int64)
    return np.arange(int(data.length[r]), dtype=np.int64)


def select_rows(cache_dir: Path, m: Manifest, n_positions: int, seed: int) -> Rows:
    """Rows drawn without replacement (seeded) until they hold at least `n_positions` target
    positions; each shard is hash-checked and only its needed rows kept (memory ~ the sample)."""
    total = sum(e.rows for e in m.shards)
    if total == 0:
        raise KdpipeError(f"cache {cache_dir} lists no rows")
    order = np.random.default_rng([seed, 0xF1DE]).permutation(total)
    starts = np.concatenate([[0], np.cumsum([e.rows for e in m.shards])])
    per_row = (m.tokens / max(m.rows, 1)) * (m.fingerprint.get("masking", {}).get("mask_prob", 0.15)
                                              if m.target_positions == "masked" else 1.0)
    stored_cols = list(get_mode(m.targets).columns)
    columns = ["seq_id", "view", "length", "input_ids", "mlm_positions", "mlm_labels", *stored_cols]
    picked: list[tuple[ShardData, int, np.ndarray]] = []
    got, taken = 0, 0
    while got < n_positions and taken < total:
        want = max(1, math.ceil(1.2 * (n_positions - got) / max(per_row, 1e-9)))
        block = order[taken:taken + want]
        taken += len(block)
        by_shard: dict[int, list[int]] = defaultdict(list)
        for g in block:
            by_shard[int(np.searchsorted(starts, g, side="right") - 1)].append(int(g))
        found: dict[int, tuple[ShardData, int]] = {}
        for s, rows in sorted(by_shard.items()):
            table = pq.read_table(open_shard(cache_dir, m.shards[s]), columns=columns)
            local = [g - int(starts[s]) for g in rows]
            sub = from_table(table.take(pa.array(local, pa.int64())))
            for i, g in enumerate(rows):
                found[g] = (sub, i)
        for g in block:  # in sample order, stopping once there are enough positions
            if got >= n_positions:
                break
            sub, i = found[int(g)]
            t = _targets_of(sub, i, m.target_positions)
            picked.append((sub, i, t))
            got += len(t)
    return _gather(picked, stored_cols)


def _gather(picked: list[tuple[ShardData, int, np.ndarray]], stored_cols: list[str]) -> Rows:
    """One ShardData of the picked rows, in order, and the cache's stored target rows beside it."""
    parts: dict[str, list[np.ndarray]] = defaultdict(list)
    stored: dict[str, list[np.ndarray]] = defaultdict(list)
    for d, i, _ in picked:
        off, mo = d.offsets(), d.mlm_offsets()
        for name in ("seq_id", "view", "length", "mlm_count"):
            parts[name].append(getattr(d, name)[i:i + 1])
        parts["input_ids"].append(d.input_ids[off[i]:off[i + 1]])
        parts["mlm_positions"].append(d.mlm_positions[mo[i]:mo[i + 1]])
        parts["mlm_labels"].append(d.mlm_labels[mo[i]:mo[i + 1]])
        to = d.target_offsets()
        for c in stored_cols:
            if c in PER_SAMPLE:  # per draw, sample_len draws per target position
                so = d.sample_offsets()
                lo, hi = so[to[i]], so[to[i + 1]]
                stored[c].append(getattr(d, c)[lo:hi])
                if c == PER_SAMPLE[0]:
                    stored["sample_len"].append(d.sample_len[to[i]:to[i + 1]])
            elif getattr(d, c) is not None:
                stored[c].append(getattr(d, c)[to[i]:to[i + 1]])
    data = ShardData(**{k: np.concatenate(v) for k, v in parts.items()})
    return Rows(data, [t for _, _, t in picked], {k: np.concatenate(v) for k, v in stored.items()})


# ---------------------------------------------------------------------------------- the models

def default_student(teacher: torch.nn.Module, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """The DistilBERT-init student: the teacher's architecture with half its layers, layers
    0, 2, 4, ... copied from it, and its embeddings and MLM head."""
    cfg = stu.student_config(teacher.config.to_dict())
    with torch.random.fork_rng(devices=[]):  # build_student seeds the global RNG
        model = stu.build_student(cfg, seed)
    layers = stu.default_layer_map(int(teacher.config.num_hidden_layers), int(cfg.num_hidden_layers))
    stu.init_from_teacher(model, teacher.state_dict(), layers)
    return model.eval(), f"DistilBERT init: teacher layers {','.join(map(str, layers))} (seed {seed})"


def load_student(spec: str) -> tuple[torch.nn.Module, str]:
    from kdpipe.pipeline.models import load_model, resolve_student

    m = resolve_student(spec)
    load_model(m)
    if m.missing_head:
        raise KdpipeError(f"student {spec} has no trained masked-LM head ({m.missing_head[0]} missing)")
    return m.module.eval(), str(m.path)


def check_teacher(model: torch.nn.Module, m: Manifest, path: str) -> None:
    want = m.fingerprint.get("teacher", {}).get("weights_sha256")
    if want is not None:
        got = weights_sha256(model)
        if got != want:
            raise CacheMismatchError(f"teacher {path} is not the teacher this cache was made from "
                                     f"(weights SHA-256 {got[:12]}..., the cache says {want[:12]}...)")
    if int(model.config.vocab_size) != m.vocab_size:
        raise CacheMismatchError(f"teacher {path} has {model.config.vocab_size} tokens, the cache {m.vocab_size}")


@torch.no_grad()
def forward_rows(rows: Rows, runner: TeacherRunner, student: torch.nn.Module, spec: FidelitySpec,
                 pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, H') teacher decoder inputs and (P, H_s) student last hidden states at the target
    positions, row-major over the sampled rows."""
    body, device = stu.body(student), runner.device
    xs, hs = [], []
    for lo in range(0, rows.data.rows, spec.batch_size):
        idx = list(range(lo, min(lo + spec.batch_size, rows.data.rows)))
        off = rows.data.offsets()
        ids, att = pad([rows.data.input_ids[off[i]:off[i + 1]] for i in idx], pad_id)
        _, x = runner.hidden_and_decoder_input(ids, att)  # (N, H') non-padding positions, row-major
        h = body(input_ids=ids.to(device), attention_mask=att.to(device))[0][att.to(device).bool()]  # (N, H_s)
        starts = np.concatenate([[0], np.cumsum([int(rows.data.length[i]) for i in idx])])
        pick = torch.from_numpy(np.concatenate([starts[j] + rows.targets[i] for j, i in enumerate(idx)]))
        xs.append(x.clone()[pick.to(device)].float())
        hs.append(h[pick.to(device)].float())
    return torch.cat(xs), torch.cat(hs)


# ----------------------------------------------------------------------------------- measuring

Key = tuple[str, int, float]  # (mode, setting, T)

class _Acc:
    """Sums over positions for one (mode, setting, T)."""

    def __init__(self) -> None:
        self.n = 0
        self.mode = self.exact = self.diff2 = 0.0
        self.cos = self.angle = self.ratio = 0.0
        self.extra = 0.0  # topk: teacher mass in the top-k; sampled: distinct draws

    def add(self, mode: torch.Tensor, exact: torch.Tensor, grad: tuple[float, float, float],
            extra: float = 0.0) -> None:
        c = int(mode.shape[0])
        d = (mode.double() - exact.double())
        self.n += c
        self.mode += mode.double().sum().item()
        self.exact += exact.double().sum().item()
        self.diff2 += (d * d).sum().item()
        self.cos, self.angle, self.ratio = (a + c * g for a, g in zip((self.cos, self.angle, self.ratio), grad))
        self.extra += c * extra


def _kl64(log_p: torch.Tensor, zs: torch.Tensor, t: float) -> torch.Tensor:
    """(C,) KL(p || softmax(zs / T)) in float64; log_p (C, V) float64."""
    return (log_p.exp() * (log_p - F.log_softmax(zs.double() / t, dim=-1))).sum(-1)


def measure(rows: Rows, x: torch.Tensor, hs: torch.Tensor, runner: TeacherRunner, head: torch.nn.Module,
            spec: FidelitySpec, seed: int) -> tuple[dict[Key, _Acc], dict[Key, dict[str, list[torch.Tensor]]]]:
    """Accumulators per (mode, setting, T), and the target columns each would store for the rows
    (per chunk), every mode's targets made by the mode as the dump makes them."""
    temps = tuple(sorted(spec.temperatures))
    weight, bias = runner.weight_t.t(), runner.bias  # (V, H'), (V,)
    d, lengths = rows.data, rows.data.length.astype(np.int64)
    keys = [(int(d.seq_id[i]), int(d.view[i]), int(lengths[i]), rows.targets[i]) for i in range(d.rows)]
    plan = {mode: mode.fidelity_settings(spec.ks, spec.samples) for mode in MODES.values()}
    plan = {mode: settings for mode, settings in plan.items() if settings}
    # (P, N) the dump's random numbers of each mode and setting, at the sampled positions
    uniforms = {(mode, n): mode.uniforms(seed, n, keys) for mode, settings in plan.items() for n in settings}
    accs: dict[Key, _Acc] = defaultdict(_Acc)
    cols: dict[Key, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    for lo in range(0, x.shape[0], spec.chunk):
        xc = x[lo:lo + spec.chunk]  # (C, H')
        with torch.no_grad():
            z = runner.logits(xc)  # (C, V) float32, the teacher's full logits
            s = head(hs[lo:lo + spec.chunk]).float()  # (C, V) the student's
            chunk = {mode: FidelityChunk(z, xc, (weight, bias), temps, {
                n: None if (u := uniforms[mode, n]) is None else u[lo:lo + spec.chunk] for n in settings})
                for mode, settings in plan.items()}
            prepared = {mode: mode.fidelity_prepare(chunk[mode], settings) for mode, settings in plan.items()}
        for ti, t in enumerate(temps):
            with torch.no_grad():
                log_p = F.log_softmax(z.double() / t, dim=-1)  # (C, V) float64
                exact = _kl64(log_p, s, t)  # (C,)
                entropy = -(log_p.exp() * log_p).sum(-1)  # (C,) H(p_T)

            def exact_fn(zs: torch.Tensor, log_p: torch.Tensor = log_p, t: float = t) -> torch.Tensor:
                return _kl64(log_p, zs, t)

            for mode, settings in plan.items():
                for n in settings:
                    case = mode.fidelity_case(chunk[mode], prepared[mode], n, ti, entropy)
                    with torch.no_grad():
                        value = case.loss(s)
                    key = (mode.name, n, t)
                    accs[key].add(value, exact, gradient_fidelity(case.loss, exact_fn, s), case.extra)
                    for name, v in case.columns.items():
                        cols[key][name].append(v)
    return accs, cols


# ------------------------------------------------------------------------------------- bytes

def _column_bytes(rows: Rows, mode: str, targets: dict[str, np.ndarray], m: Manifest, setting: int,
                  n_temps: int, state_dim: int, workdir: Path) -> int:
    """Compressed bytes of a mode's target columns for the sampled rows, written by the shard
    writer with the cache's zstd level."""
    d = rows.data
    schema = shard_schema(m.vocab_size, setting, n_temps, 1, mode, state_dim)
    names = get_mode(mode).columns
    sub = pa.schema([schema.field(c) for c in names])
    data = ShardData(seq_id=d.seq_id, view=d.view, length=d.length, input_ids=d.input_ids,
                     mlm_count=d.mlm_count, mlm_positions=d.mlm_positions, mlm_labels=d.mlm_labels,
                     target_count=np.array([len(t) for t in rows.targets]), **targets)
    path = workdir / f"{mode}.parquet"
    level = int(m.fingerprint.get("storage", {}).get("zstd_level", 3))
    write_shard(path, to_table(data, sub), "0" * 64, level)
    return sum(v for c, v in column_bytes(path).items() if c in names)


# ------------------------------------------------------------------------------------ the report

def run_fidelity(cache_dir: Path, teacher: str, student: str | None, spec: FidelitySpec) -> dict[str, Any]:
    """The whole measurement; returns the report (rows of the table, plus what it was made from)."""
    cache_dir = Path(cache_dir)
    m = load_manifest(cache_dir)
    problems = spec.problems(m.vocab_size)
    if problems:
        raise KdpipeError("; ".join(problems))
    path = resolve_model_path(teacher)
    model = load_teacher(path)
    check_teacher(model, m, teacher)
    if student is None:
        smodel, sdesc = default_student(model, spec.seed)
    else:
        smodel, sdesc = load_student(student)
        if int(smodel.config.vocab_size) != m.vocab_size:
            raise CacheMismatchError(f"student {student} has {smodel.config.vocab_size} tokens, "
                                     f"the cache {m.vocab_size}")
    device = pick_device(spec.device)
    runner = TeacherRunner(model, 1, (1.0,), torch.eye(int(model.config.hidden_size)), device)
    smodel.to(device)
    rows = select_rows(cache_dir, m, spec.positions, spec.seed)
    pad_id = int(getattr(model.config, "pad_token_id", None) or 0)
    x, hs = forward_rows(rows, runner, smodel, spec, pad_id)
    seed = int(m.fingerprint.get("masking", {}).get("seed", 0))
    temps = tuple(sorted(spec.temperatures))
    accs, chunks = measure(rows, x, hs, runner, stu.mlm_head(smodel), spec, seed)
    made = {key: {name: torch.cat(parts).cpu().numpy() for name, parts in c.items()}
            for key, c in chunks.items()}

    tokens = int(rows.data.length.sum())
    n_targets = rows.n_targets
    bytes_of: dict[Key, int] = {}
    with tempfile.TemporaryDirectory(prefix="kdpipe-fidelity-") as tmp:
        for (mode, setting, t), columns in made.items():
            bytes_of[(mode, setting, t)] = _column_bytes(rows, mode, columns, m, setting, len(temps),
                                                         int(x.shape[1]), Path(tmp))

    results = []
    order = lambda kv: (kv[0][2], MODE_NAMES.index(kv[0][0]), kv[0][1])  # noqa: E731  (T, mode, setting)
    for (mode, setting, t), a in sorted(accs.items(), key=order):
        mean_mode, mean_exact = a.mode / a.n, a.exact / a.n
        var = max(a.diff2 / a.n - ((a.mode - a.exact) / a.n) ** 2, 0.0)
        results.append({
            "mode": mode, "setting": setting, "temperature": t,
            "loss_ce": mean_mode * t * t, "loss_ce_exact": mean_exact * t * t,
            "loss_rel_error": (mean_mode - mean_exact) / mean_exact if mean_exact > 0 else float("nan"),
            "loss_rel_error_se": math.sqrt(var / a.n) / mean_exact if mean_exact > 0 else float("nan"),
            "grad_cosine": a.cos / a.n, "grad_angle_deg": a.angle / a.n, "grad_norm_ratio": a.ratio / a.n,
            "bytes_per_token": bytes_of[(mode, setting, t)] / tokens,
            "bytes_per_target": bytes_of[(mode, setting, t)] / n_targets,
            **({extra: a.extra / a.n} if (extra := get_mode(mode).fidelity_extra) else {}),
        })
    return {
        "cache": str(cache_dir), "cache_fingerprint_sha256": m.fingerprint_sha256,
        "cache_targets": m.targets, "target_positions": m.target_positions,
        "teacher": str(teacher), "student": sdesc, "device": str(device),
        "rows": rows.data.rows, "positions": n_targets, "tokens": tokens,
        "spec": {"positions": spec.positions, "k": list(spec.ks), "samples": list(spec.samples),
                 "temperatures": list(temps), "seed": spec.seed, "draw_seed": seed},
        "bytes_measured": (f"each target column written by the shard writer (zstd level "
                           f"{m.fingerprint.get('storage', {}).get('zstd_level', 3)}, plain encoding) "
                           f"for the {rows.data.rows} sampled rows, divided by their {tokens} tokens"),
        "cache_bytes_per_token_by_column": m.bytes_per_token_by_column,
        "cache_check": cache_check(rows, m, made),
        "results": results,
    }


def cache_check(rows: Rows, m: Manifest, made: dict[Key, dict[str, np.ndarray]]) -> dict[str, Any] | None:
    """The cache's stored targets at the sampled positions against the ones its mode made here."""
    mine = {(setting, t): c for (mode, setting, t), c in made.items() if mode == m.targets}
    return get_mode(m.targets).fidelity_check(rows.stored, mine, TargetSettings.of_manifest(m))


def markdown(report: dict[str, Any]) -> str:
    """The report's table, one line per (mode, setting, T)."""
    head = ("| T | mode | setting | L_ce (mode) | L_ce (exact) | rel. error | grad cos | grad angle | "
            "norm ratio | B/token | detail |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    lines = [head]
    for r in report["results"]:
        mode = get_mode(r["mode"])
        setting = mode.fidelity_label(r["setting"])
        detail = mode.fidelity_detail(r[mode.fidelity_extra]) if mode.fidelity_extra else ""
        err = f"{100 * r['loss_rel_error']:+.2f}%"
        if mode.stochastic:
            err += f" ± {100 * r['loss_rel_error_se']:.2f}"
        lines.append(f"| {r['temperature']:g} | {r['mode']} | {setting} | {r['loss_ce']:.4g} | "
                     f"{r['loss_ce_exact']:.4g} | {err} | {r['grad_cosine']:.4f} | {r['grad_angle_deg']:.1f}° | "
                     f"{r['grad_norm_ratio']:.3f} | {r['bytes_per_token']:.1f} | {detail} |")
    return "\n".join(lines)

