"""`kdpipe teacher-dump`: corpus + frozen teacher -> a reusable, verifiable distillation cache.

    kdpipe teacher-dump --teacher PATH --data corpus.txt --out caches/mini \
        --top-k 32 --temperatures 1,2,4 --hidden-proj pca --hidden-dim 128
    torchrun --nproc-per-node 2 "$(which kdpipe)" teacher-dump ...   # shard i on rank i % 2

Set up (resolve inputs, count the corpus, guard the fingerprint, fix the projection), run (one
shard at a time: mask, teacher, reduce, write), finish (the manifest, last). The shard is the
unit of work: a rerun after any interruption skips the finished shards and ends byte-identical
to an uninterrupted run (same machine, batch size and device).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import click
import numpy as np
import pyarrow as pa
import torch
from pydantic import Field, field_validator, model_validator
from tqdm import tqdm

from kdpipe import __version__
from kdpipe.pipeline import cache as cachedir
from kdpipe.pipeline import cache_card
from kdpipe.pipeline import corpus as corpus_mod
from kdpipe.pipeline import corpus_index, distributed, layer_targets, relation_targets
from kdpipe.pipeline import projection as proj
from kdpipe.pipeline import storage, values
from kdpipe.pipeline.compiling import CompileSettings, compile_options
from kdpipe.pipeline.config import (
    build_config, config_option, echo_json, floats_option, ints_option, sorted_distinct,
)
from kdpipe.pipeline.cores import MAX_WORKERS, default_workers
from kdpipe.pipeline.device import configure, pick_device
from kdpipe.pipeline.errors import KdpipeError
from kdpipe.pipeline.fsutil import (
    TMP_SUFFIX, atomic_dir, atomic_write_bytes, atomic_write_json, ensure_dir, exclusive_lock,
    remove_stale_tmp, sha256_file,
)
from kdpipe.pipeline.corpus_index import ShardStart
from kdpipe.pipeline.dump import RowSpec, TeacherPass, dump_shard, length_batches, mask_rows, run_teacher, shard_data
from kdpipe.pipeline.masking import DRAWS, MaskingSpec, Vocabulary, token_weights
from kdpipe.pipeline.modes import DEFAULT_MODE, MODE_NAMES, MODES, TargetMode, TargetSettings, get_mode
from kdpipe.pipeline.padding import pad
from kdpipe.pipeline.prefetch import Prefetcher
from kdpipe.pipeline.provenance import provenance
from kdpipe.pipeline.shards import (
    column_bytes, encode_shard, read_fingerprint, shard_path, stored_dtypes, to_table,
)
from kdpipe.pipeline.teacher import (
    TeacherRunner, decoder_of, load_model_config, load_teacher, load_tokenizer,
    resolve_model_path, save_head, tokenizer_sha256, weights_sha256,
)
from kdpipe.pipeline.writers import ShardWriters
from kdpipe.schemas.manifest import FINGERPRINT_NAME, MANIFEST_NAME, FileEntry, Manifest, ShardEntry
from kdpipe.schemas.shard import SCHEMA_VERSION, shard_schema


class DumpConfig(CompileSettings):
    teacher: str
    data: list[str] = Field(min_length=1)
    out: str
    text_column: str = "text"
    data_split: str = "train"
    format: Literal["auto", "text", "json", "parquet", "csv", "tsv", "disk", "repo"] = "auto"
    seq_len: int = Field(128, ge=8, le=65535)
    packing: Literal["pack", "line"] = "pack"
    max_sequences: int | None = Field(None, ge=1)
    mask_prob: float = Field(0.15, gt=0, lt=1)
    mask_token_prob: float = Field(0.8, ge=0, le=1)
    random_token_prob: float = Field(0.1, ge=0, le=1)
    mask_smoothing: float = Field(0.0, ge=0, le=2)
    mask_views: int = Field(1, ge=1, le=1024)
    seed: int = Field(0, ge=0)
    targets: Literal[MODE_NAMES] = DEFAULT_MODE  # type: ignore[valid-type]
    target_positions: Literal["all", "masked"] = "all"
    top_k: int = Field(32, ge=1)
    temperatures: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0], min_length=1)
    samples: int = Field(32, ge=1, le=65535)
    hidden_proj: Literal["identity", "random", "pca"] = "pca"
    hidden_dim: int | None = Field(None, ge=1)  # default: full width (identity), else 128
    hidden_layers: list[int] = Field(default_factory=list)  # other layers' states too (pipeline/layer_targets.py)
    relation_layer: int | None = Field(None, ge=1)  # its attention projections too (relation_targets.py)
    relation_parts: Literal[relation_targets.PART_CHOICES] | None = None  # type: ignore[valid-type]  # qkv
    pca_sequences: int = Field(64, ge=1)
    shard_size: int = Field(1024, ge=1)
    batch_size: int = Field(32, ge=1)
    zstd_level: int = Field(3, ge=1, le=22)
    writers: int = Field(default_factory=default_workers, ge=1, le=MAX_WORKERS)  # bytes never depend on it
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # of the teacher's forward pass
    tf32: bool = False
    dry_run: bool = False

    @field_validator("temperatures")
    @classmethod
    def _temps(cls, v: list[float]) -> list[float]:
        return sorted_distinct(v, lambda t: t <= 0, "temperatures must be positive", "temperatures")

    @field_validator("hidden_layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        return sorted_distinct(v, lambda x: x < 0, "hidden_layers must be 0 (the embeddings' output) or more",
                               "hidden_layers")

    @model_validator(mode="before")
    @classmethod
    def _mode_defaults(cls, data: Any) -> Any:
        """The target mode's own defaults (sampled: one temperature; exact: the full hidden width)."""
        if isinstance(data, dict) and data.get("targets", DEFAULT_MODE) in MODES:
            data = MODES[data.get("targets", DEFAULT_MODE)].dump_defaults(dict(data))
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "DumpConfig":
        problems = []
        if self.mask_token_prob + self.random_token_prob > 1:
            problems.append("mask_token_prob + random_token_prob must not exceed 1")
        problems += self.mode.dump_problems(temperatures=self.temperatures, hidden_proj=self.hidden_proj)
        if self.hidden_layers and not self.mode.uses_teacher:
            problems.append(f"hidden_layers: mode {self.targets} runs no teacher and stores no hidden states")
        if self.relation_layer is not None and not self.mode.uses_teacher:
            problems.append(f"relation_layer: mode {self.targets} runs no teacher and stores no relation targets")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def mode(self) -> TargetMode:
        return get_mode(self.targets)

    def masking(self) -> MaskingSpec:
        return MaskingSpec(self.mask_prob, self.mask_token_prob, self.random_token_prob,
                           self.mask_smoothing, self.seed)


@dataclass
class Setup:
    cfg: DumpConfig
    out: Path
    tokenizer: Any
    model: torch.nn.Module | None  # None in mode none: no teacher forward, no weights read
    model_config: Any
    corpus: corpus_mod.Corpus
    vocab: Vocabulary
    pool: np.ndarray  # ids a masked position may be replaced with
    n_sequences: int
    n_tokens: int
    weights: np.ndarray | None
    fingerprint: dict[str, Any]
    hidden_dim: int
    starts: list[ShardStart]  # where each shard's sequences are cut from the corpus

    @property
    def rows(self) -> RowSpec:
        c = self.cfg
        return RowSpec(c.masking(), c.mask_views, self.vocab, self.pool, self.weights, c.targets,
                       c.target_positions, c.samples, c.batch_size, int(self.tokenizer.pad_token_id))


# ---------------------------------------------------------------------------------------- set up

def _sequences(s: Setup) -> "itertools.islice[np.ndarray]":
    it = corpus_mod.iter_sequences(s.corpus, s.tokenizer, s.cfg.seq_len, s.cfg.packing)
    return itertools.islice(it, s.cfg.max_sequences)


@dataclass(frozen=True)
class Counted:
    """What the counting pass learns: sequences and tokens (fingerprint, progress), the masking
    weights from the token counts, where each shard starts (so the shard loop tokenises only the
    shards it makes). Under torchrun one rank counts and tells the others."""

    sequences: int
    tokens: int
    weights: np.ndarray | None
    starts: list[ShardStart]


def _count(cfg: DumpConfig, corpus: corpus_mod.Corpus, tokenizer: Any, vocab: Vocabulary) -> Counted:
    """One cheap pass over the corpus (tokenizer only)."""
    counts = np.zeros(vocab.size, dtype=np.int64) if cfg.mask_smoothing > 0 else None
    n = tokens = 0
    starts: list[ShardStart] = []
    it = itertools.islice(corpus_index.indexed_sequences(corpus, tokenizer, cfg.seq_len, cfg.packing),
                          cfg.max_sequences)
    for seq, start in tqdm(corpus_index.shard_starts(it, cfg.shard_size), desc="tokenizing", unit=" seq",
                           leave=False, mininterval=1.0, disable=not distributed.world().is_main):
        n += 1
        tokens += len(seq)
        if start is not None:
            starts.append(start)
        if counts is not None:
            counts += np.bincount(seq, minlength=vocab.size)
    weights = token_weights(counts, cfg.mask_smoothing, vocab.special_ids) if counts is not None else None
    return Counted(n, tokens, weights, starts)


def set_up(cfg: DumpConfig, count: bool = True) -> Setup:
    """Inputs resolved and checked, the corpus counted (unless `count` is False: then `counted`
    fills it in, from a rank that counted)."""
    teacher_path = resolve_model_path(cfg.teacher)
    corpus = corpus_mod.resolve_corpus(cfg.data, cfg.text_column, cfg.data_split, cfg.format)  # fails fast
    tokenizer = load_tokenizer(teacher_path)
    model = load_teacher(teacher_path) if cfg.mode.uses_teacher else None
    mcfg = model.config if model is not None else load_model_config(teacher_path)
    vocab_size = int(mcfg.vocab_size)
    if len(tokenizer) > vocab_size:
        raise KdpipeError(f"tokenizer has {len(tokenizer)} tokens but the teacher's vocabulary is {vocab_size}")
    if problems := cfg.mode.teacher_problems(top_k=cfg.top_k, vocab_size=vocab_size):
        raise KdpipeError("; ".join(problems))
    max_pos = getattr(mcfg, "max_position_embeddings", None)
    if max_pos is not None and cfg.seq_len > max_pos:
        raise KdpipeError(f"--seq-len {cfg.seq_len} is over the teacher's limit of {max_pos} positions")
    if problems := layer_targets.dump_problems(cfg.hidden_layers, int(mcfg.num_hidden_layers)) + \
            relation_targets.dump_problems(cfg.relation_layer, cfg.relation_parts, int(mcfg.num_hidden_layers)):
        raise KdpipeError("; ".join(problems))
    hidden_dim = proj.check_dim(cfg.hidden_proj, int(mcfg.hidden_size), cfg.hidden_dim) \
        if cfg.mode.uses_teacher else 0
    special = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    vocab = Vocabulary(vocab_size, tokenizer.mask_token_id, special)
    fingerprint = {
        "schema_version": SCHEMA_VERSION,
        "teacher": {"weights_sha256": weights_sha256(model) if model is not None else None,
                    "model_type": mcfg.model_type,
                    "hidden_size": int(mcfg.hidden_size), "vocab_size": vocab_size,
                    **_precision_fingerprint(cfg)},
        "tokenizer": {"sha256": tokenizer_sha256(tokenizer), "vocab_size": len(tokenizer)},
        "corpus": {**corpus.fingerprint, "max_sequences": cfg.max_sequences},
        "sequences": {"seq_len": cfg.seq_len, "packing": cfg.packing},  # + count, tokens (counted)
        "masking": {"draws": DRAWS, "mask_prob": cfg.mask_prob, "mask_token_prob": cfg.mask_token_prob,
                    "random_token_prob": cfg.random_token_prob, "smoothing": cfg.mask_smoothing,
                    "seed": cfg.seed, "views": cfg.mask_views},
        "targets": {"mode": cfg.targets, "positions": cfg.target_positions,
                    **cfg.mode.fingerprint(_target_settings(cfg, model))},
        "hidden": None if not cfg.mode.uses_teacher else {
            "projection": cfg.hidden_proj, "dim": hidden_dim, "seed": cfg.seed,
            "pca_sequences": cfg.pca_sequences if cfg.hidden_proj == "pca" else None,
            **layer_targets.fingerprint(cfg.hidden_layers)},
        "storage": {"shard_size": cfg.shard_size, "zstd_level": cfg.zstd_level},
        **relation_targets.fingerprint(cfg.relation_layer, cfg.relation_parts),
    }
    s = Setup(cfg, Path(cfg.out), tokenizer, model, mcfg, corpus, vocab, vocab.random_pool(), 0, 0, None,
              fingerprint, hidden_dim, [])
    return counted(s, _count(cfg, corpus, tokenizer, vocab)) if count else s


def counted(s: Setup, c: Counted) -> Setup:
    """The setup with the counting pass's results (the fingerprint records the counts)."""
    if c.sequences == 0:
        raise KdpipeError(f"corpus {', '.join(s.cfg.data)} holds no text")
    fp = {**s.fingerprint, "sequences": {**s.fingerprint["sequences"], "count": c.sequences, "tokens": c.tokens}}
    return dataclasses.replace(s, n_sequences=c.sequences, n_tokens=c.tokens, weights=c.weights, fingerprint=fp,
                               starts=c.starts)


def _counted(s: Setup) -> Counted:
    return Counted(s.n_sequences, s.n_tokens, s.weights, s.starts)


def _precision_fingerprint(cfg: DumpConfig) -> dict[str, Any]:
    """The teacher's precision changes the stored values, so a cache records it; fp32 without
    TF32, the default, adds nothing (a cache made before the choice existed keeps its fingerprint).
    Compiling the teacher may change them too (inductor fuses and reorders float operations: on a
    tiny BERT its float32 logits were 1.2e-7 from eager's, not equal), so a compiled dump records
    its backend and mode, whatever the backend: a cache is then resumed only as it was begun."""
    out: dict[str, Any] = {}
    if cfg.precision != "fp32":
        out["precision"] = cfg.precision
    if cfg.tf32:
        out["tf32"] = True
    return out | cfg.compile_record()


def _target_settings(cfg: DumpConfig, model: torch.nn.Module | None) -> TargetSettings:
    """The settings the target mode reads (each mode's fingerprint holds only the ones it uses)."""
    state_dim = int(decoder_of(model).weight.shape[1]) if model is not None else 0
    return TargetSettings(top_k=cfg.top_k, temperatures=tuple(cfg.temperatures), samples=cfg.samples,
                          state_dim=state_dim)


def _build_projection(s: Setup, runner_for: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The last layer's (H, d) projection and the (n, H, d) stack of the other stored layers' (None
    without --hidden-layers): identity and random are one matrix for every layer; pca is fitted
    on each layer's own states."""
    width, n = s.fingerprint["teacher"]["hidden_size"], len(s.cfg.hidden_layers)
    stack = (lambda m: m.expand(n, *m.shape).clone() if n else None)  # noqa: E731
    if s.cfg.hidden_proj == "identity":
        return proj.identity(width), stack(proj.identity(width))
    if s.cfg.hidden_proj == "random":
        m = proj.random_orthogonal(width, s.hidden_dim, s.cfg.seed)
        return m, stack(m)
    # pca: fitted on the teacher's states for the first sequences, masked as they will be stored
    runner: TeacherRunner = runner_for(proj.identity(width), proj.identity(width).expand(n, width, width))
    seqs = list(itertools.islice(_sequences(s), s.cfg.pca_sequences))
    rows = [mask_rows(s.rows, i, seq)[0] for i, seq in enumerate(seqs)]
    states: list[list[torch.Tensor]] = [[] for _ in range(n + 1)]  # the last layer's, then each other's
    for batch in length_batches(rows, s.cfg.batch_size):
        ids, att = pad([rows[i].input_ids for i in batch], s.tokenizer.pad_token_id)
        for i, st in enumerate(runner.states(ids, att)):
            states[i].append(st.cpu())
    fitted = [proj.fit_pca(torch.cat(st), s.hidden_dim) for st in states]
    return fitted[0], torch.stack(fitted[1:]) if n else None


# ------------------------------------------------------------------------------------------- run

def _shard_done(path: Path, fp_sha: str) -> bool:
    """A shard under its final name was completed by a run with these settings."""
    try:
        return path.is_file() and read_fingerprint(path) == fp_sha
    except Exception:  # unreadable footer: treat as unfinished and redo it
        return False


def run(s: Setup, w: distributed.World | None = None) -> Manifest | None:
    """Dump this rank's shards (all of them in a world of one); rank 0 then writes the manifest
    once every rank has finished. Returns the manifest on rank 0, None on the others."""
    w = w or distributed.World()
    out = s.out
    fp_sha = cachedir.fingerprint_sha256(s.fingerprint)
    schema = _schema(s)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    device = distributed.local_device(pick_device(s.cfg.device), w)

    written: dict[Path, str] = {}

    def dump_own() -> None:
        if not w.is_main and not (out / FINGERPRINT_NAME).is_file():
            raise KdpipeError(f"rank {w.rank} does not see the cache {out} that rank 0 set up: the "
                              "cache directory must be on a file system every rank shares")
        ensure_dir(out / "shards", "cache directory")
        # other ranks load the projection rank 0 fitted and saved before they got here
        written.update(_dump_shards(s, _prepare_runner(s, device), w, fp_sha, schema))

    distributed.agree(w, dump_own)  # every rank's shards exist past this point
    if not w.is_main:
        return None
    n_shards = -(-s.n_sequences // s.cfg.shard_size)
    return finish(s, fp_sha, n_shards, started, written)


def _dump_shards(s: Setup, runner: TeacherRunner | None, w: distributed.World, fp_sha: str,
                 schema: pa.Schema) -> dict[Path, str]:
    """The shards rank w.rank owns that are not finished yet. Only their texts are tokenised
    (`corpus_index.shard_sequences`: sequences are numbered by their place in the stream, and the
    counting pass noted where each shard starts), in a thread, ahead of the teacher. Returns the
    SHA-256 of each shard written."""
    c = s.cfg
    total = s.n_tokens * c.mask_views if not w.distributed else None  # a rank's share is unknown
    n_shards = len(s.starts)
    tokens = [b.tokens_before for b in s.starts[1:]] + [s.n_tokens]
    # the bar is closed on an error too, so the error message starts a line of its own
    with tqdm(total=total, desc="teacher-dump", unit=" tok", unit_scale=True, mininterval=1.0,
              smoothing=0.1, disable=not w.is_main) as bar:
        todo = []
        for index in filter(w.owns_shard, range(n_shards)):
            if _shard_done(s.out / shard_path(index), fp_sha):
                bar.update((tokens[index] - s.starts[index].tokens_before) * c.mask_views)
            else:
                todo.append(index)
        chunks = Prefetcher(corpus_index.shard_sequences(s.corpus, s.tokenizer, c.seq_len, c.packing, s.starts,
                                                         c.shard_size, s.n_sequences, todo), depth=2)
        try:
            with ShardWriters(c.writers, schema, fp_sha, c.zstd_level) as pool:
                dump_shards(s.rows, runner, iter(chunks), c.shard_size, s.out, pool, progress=bar.update,
                            check=lambda index, n, data: _check_values(s, index, n, data, schema))
        finally:
            chunks.close()
        return pool.written


def dump_shards(rows: RowSpec, runner: Any, chunks: Iterator[tuple[int, list[np.ndarray]]], shard_size: int,
                out: Path, pool: ShardWriters, progress: Callable[[int], None] = lambda n: None,
                check: Callable[[int, int, Any], None] = lambda index, n, data: None) -> None:
    """The shard loop over (index, sequences) of the shards to make: the teacher runs here, the
    pool masks the next shards ahead of it and encodes the finished ones behind it (with several
    writers, the writers also gather each shard's columns and check its values)."""
    ahead: deque[tuple[int, list[np.ndarray], Future | None]] = deque()
    stored = stored_dtypes(pool.schema)  # narrowed once, as the batches' outputs are gathered
    while True:
        while len(ahead) <= pool.maskers and (nxt := next(chunks, None)) is not None:
            ahead.append((*nxt, pool.mask(rows, nxt[0] * shard_size, nxt[1])))
        if not ahead:
            break
        index, chunk, masked = ahead.popleft()
        done = run_teacher(rows, runner, index * shard_size, chunk, None if masked is None else masked.result())
        make = functools.partial(_finished, rows, done, stored, check, index)
        pool.submit(out / shard_path(index), make if pool.gathers else make())
        progress(done.tokens)
    pool.drain()


def _finished(rows: RowSpec, done: TeacherPass, stored: dict[str, np.dtype],
              check: Callable[[int, int, Any], None], index: int) -> Any:
    """A shard's data from the teacher's outputs, refused before it is stored (pipeline/values.py)
    if its values are out of range."""
    data = shard_data(rows, done, stored)
    check(index, done.seqs, data)
    return data


def _check_values(s: Setup, index: int, n_seqs: int, data: Any, schema: pa.Schema) -> None:
    """A shard's values before they are stored (pipeline/values.py): a teacher whose logits
    overflow float16, or whose outputs are not finite, is refused rather than stored as inf."""
    c = s.cfg
    fields = get_mode(c.targets).manifest_fields(_target_settings(c, s.model))  # as the manifest will say
    lim = values.Limits(s.vocab.size, c.seq_len, c.mask_views, c.target_positions, tuple(fields["temperatures"]),
                        fields["samples"], values.float_limits(schema))
    try:
        values.check(data, lim, index * c.shard_size, n_seqs)
    except values.ValueProblem as e:
        made_by_teacher = e.column in values.FLOAT_COLUMNS or e.column in ("topk_ids", "sample_ids")
        advice = ("the teacher's outputs are not finite or exceed what the cache stores (float16: |x| <= 65504): "
                  "its weights or its masked-LM head are broken or badly scaled (a huge decoder bias, say); fix "
                  "the teacher, then rerun") if made_by_teacher else "this is a kdpipe bug: please report it"
        raise KdpipeError(f"shard {index} ({s.out / shard_path(index)}) not written: {e}; {advice}") from None


def _schema(s: Setup) -> pa.Schema:
    t = _target_settings(s.cfg, s.model)
    return cache_card.describe(
        shard_schema(s.vocab.size, t.top_k, len(t.temperatures), s.hidden_dim, s.cfg.targets, t.state_dim,
                     len(s.cfg.hidden_layers), _relation_width(s)),
        s.fingerprint)


def _prepare_runner(s: Setup, device: torch.device) -> TeacherRunner | None:
    """The projection (fitted or loaded), the head file of the exact mode, and a runner whose
    split head is checked against the model's own logits; None in mode none."""
    if s.model is None:
        return None

    def runner_for(p: torch.Tensor, layer_p: torch.Tensor | None) -> TeacherRunner:
        return TeacherRunner(s.model, s.cfg.top_k, tuple(s.cfg.temperatures), p, device,
                             mode=s.cfg.targets, precision=s.cfg.precision,
                             layers=tuple(s.cfg.hidden_layers), layer_projections=layer_p,
                             compile_spec=s.cfg.compile_spec(), **_relation_args(s.cfg))

    proj_path = s.out / cachedir.PROJECTION_NAME
    if proj_path.exists():
        projection = proj.load_projection(proj_path)
        layer_p = proj.load_layer_projections(proj_path) if s.cfg.hidden_layers else None
    else:
        projection, layer_p = _build_projection(s, runner_for)
        proj.save_projection(proj_path, projection, layer_p)
    if s.cfg.mode.needs_head and not (s.out / cachedir.HEAD_NAME).exists():
        save_head(s.out / cachedir.HEAD_NAME, decoder_of(s.model))
    runner = runner_for(projection, layer_p)
    first = next(iter(_sequences(s)))
    runner.check_head_split(*pad([first], s.tokenizer.pad_token_id))
    return runner


def _relation_args(cfg: DumpConfig) -> dict[str, Any]:
    """The runner's relation settings (pipeline/relation_targets.py)."""
    return {"relation_layer": cfg.relation_layer, "relation_parts": cfg.relation_parts or relation_targets.DEFAULT_PARTS}


def _relation_entry(s: Setup) -> dict[str, Any] | None:
    """The manifest's relation entry (None without --relation-layer); the width is the layer's own
    projections' (mode none, which has no model, refuses relations)."""
    if s.cfg.relation_layer is None:
        return None
    dim = relation_targets.LayerParts(s.model, s.cfg.relation_layer - 1, relation_targets.PARTS).dim
    return relation_targets.entry(s.cfg.relation_layer, s.cfg.relation_parts, dim,
                                  int(s.model_config.num_attention_heads))


def _relation_width(s: Setup) -> int:
    """Entries per token of the relation column (0: none)."""
    e = _relation_entry(s)
    return e["dim"] * len(e["parts"]) if e else 0


def _save_tokenizer(s: Setup) -> list[FileEntry]:
    """The teacher's tokenizer inside the cache, so a student run needs nothing else."""
    target = s.out / cachedir.TOKENIZER_DIR
    if not target.is_dir():
        with atomic_dir(target) as tmp:
            s.tokenizer.save_pretrained(str(tmp))
    return [cachedir.file_entry(s.out, p.relative_to(s.out).as_posix())
            for p in sorted(target.iterdir()) if p.is_file()]


# ---------------------------------------------------------------------------------------- finish

def finish(s: Setup, fp_sha: str, n_shards: int, started: str, hashed: dict[Path, str] | None = None
           ) -> Manifest:
    """Hash every shard (unless this run wrote it and hashed its bytes then) and write the
    manifest: the commit point of the cache."""
    import pyarrow.parquet as pq

    out, size, mode = s.out, s.cfg.shard_size, s.cfg.mode
    entries, by_column = [], Counter()
    for index in range(n_shards):
        rel = shard_path(index)
        path = out / rel
        md = pq.ParquetFile(path).metadata
        num_seqs = min(size, s.n_sequences - index * size)
        tokens = int(pq.read_table(path, columns=["length"]).column("length").to_numpy().sum())
        entries.append(ShardEntry(path=rel, index=index, first_seq=index * size, num_seqs=num_seqs,
                                  rows=md.num_rows, tokens=tokens, bytes=path.stat().st_size,
                                  sha256=(hashed or {}).get(path) or sha256_file(path)))
        by_column.update(column_bytes(path))
    tokens = sum(e.tokens for e in entries)
    total = sum(e.bytes for e in entries)
    manifest = Manifest(
        schema_version=SCHEMA_VERSION, fingerprint=s.fingerprint, fingerprint_sha256=fp_sha,
        vocab_size=s.vocab.size, seq_len=s.cfg.seq_len, targets=mode.name,
        target_positions=s.cfg.target_positions, **mode.manifest_fields(_target_settings(s.cfg, s.model)),
        hidden_dim=s.hidden_dim, hidden_layers=list(s.cfg.hidden_layers), relation=_relation_entry(s),
        projection=cachedir.file_entry(out, cachedir.PROJECTION_NAME) if mode.uses_teacher else None,
        head=cachedir.file_entry(out, cachedir.HEAD_NAME) if mode.needs_head else None,
        teacher_config=cachedir.file_entry(out, cachedir.TEACHER_CONFIG_NAME),
        tokenizer=_save_tokenizer(s),
        shards=entries, sequences=s.n_sequences,
        rows=sum(e.rows for e in entries), tokens=tokens, bytes=total,
        bytes_per_token=round(total / max(tokens, 1), 3),
        bytes_per_token_by_column={k: round(v / max(tokens, 1), 3) for k, v in sorted(by_column.items())},
        created_at=started, finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    atomic_write_bytes(out / cache_card.CARD_NAME, cache_card.render(manifest).encode())  # before the manifest
    atomic_write_json(out / MANIFEST_NAME, manifest.model_dump(mode="json"))
    return manifest


def dry_run(s: Setup) -> dict[str, Any]:
    """Estimate time and size from a couple of batches, writing nothing."""
    device = pick_device(s.cfg.device)
    width = s.fingerprint["teacher"]["hidden_size"]
    p = proj.random_orthogonal(width, max(s.hidden_dim, 1), s.cfg.seed)
    runner = None if s.model is None else TeacherRunner(
        s.model, s.cfg.top_k, tuple(s.cfg.temperatures), p, device, mode=s.cfg.targets,
        precision=s.cfg.precision, layers=tuple(s.cfg.hidden_layers),
        layer_projections=p.expand(len(s.cfg.hidden_layers), *p.shape), compile_spec=s.cfg.compile_spec(),
        **_relation_args(s.cfg))
    seqs = list(itertools.islice(_sequences(s), max(1, 2 * s.cfg.batch_size // s.cfg.mask_views)))
    dump_shard(s.rows, runner, 0, seqs[: max(1, s.cfg.batch_size // s.cfg.mask_views)])  # warm-up
    t0 = time.perf_counter()
    data = dump_shard(s.rows, runner, 0, seqs)
    elapsed = time.perf_counter() - t0
    sink = pa.BufferOutputStream()
    encode_shard(to_table(data, _schema(s)), sink, s.cfg.zstd_level)
    bpt = sink.getvalue().size / data.tokens
    total_tokens = s.n_tokens * s.cfg.mask_views
    return {"sequences": s.n_sequences, "rows": s.n_sequences * s.cfg.mask_views,
            "tokens": total_tokens, "shards": -(-s.n_sequences // s.cfg.shard_size),
            "tokens_per_s": round(data.tokens / elapsed, 1),
            "estimated_seconds": round(total_tokens / (data.tokens / elapsed), 1),
            "bytes_per_token": round(bpt, 1), "estimated_bytes": int(bpt * total_tokens),
            "device": str(device)}


def _refuse_foreign(out: Path) -> None:
    """Refuse a directory holding anything but a kdpipe cache, or the leftovers of a run killed
    before it wrote the fingerprint (the lock file, the fingerprint's temporary)."""
    if (out / FINGERPRINT_NAME).exists() or (out / MANIFEST_NAME).exists():
        return  # a cache (check_fingerprint judges it)

    def ours(name: str) -> bool:
        return name == ".lock" or (name.startswith(f".{FINGERPRINT_NAME}.") and name.endswith(TMP_SUFFIX))

    if any(not ours(p.name) for p in out.iterdir()):
        raise KdpipeError(f"{out} is not empty and holds no kdpipe cache; refusing to write into it")


def _claim(s: Setup, cfg: DumpConfig, held: ExitStack, w: distributed.World) -> dict[str, Any]:
    """Rank 0's one-time setup under the cache's lock (held until `held` closes): refusals, the
    fingerprint, run info, teacher config and, with several ranks, the projection and exact-mode
    head, which the other ranks load rather than fit. Returns {"resuming": bool} or, for a
    finished cache, the summary to print."""
    ensure_dir(s.out, "cache directory")
    _refuse_foreign(s.out)  # before the lock file: a refused run leaves a foreign folder as it was
    held.enter_context(exclusive_lock(s.out, "cache"))
    # refusals first: a cache with other settings is left as it is, temporaries included
    resuming = cachedir.check_fingerprint(s.out, s.fingerprint)
    if not resuming:
        _refuse_foreign(s.out)
    remove_stale_tmp(s.out)
    remove_stale_tmp(s.out / "shards")
    if resuming and (s.out / MANIFEST_NAME).exists():
        m = cachedir.load_manifest(s.out)
        return {"cache": str(s.out), "status": "already complete", "shards": len(m.shards),
                "tokens": m.tokens, "bytes_per_token": m.bytes_per_token}
    if not resuming:
        atomic_write_json(s.out / FINGERPRINT_NAME, s.fingerprint)
    atomic_write_json(s.out / cachedir.RUN_INFO_NAME, provenance(cfg))
    atomic_write_bytes(s.out / cachedir.TEACHER_CONFIG_NAME,
                       json.dumps(s.model_config.to_dict(), indent=2, sort_keys=True).encode())
    if w.distributed:
        ensure_dir(s.out / "shards", "cache directory")
        _prepare_runner(s, distributed.local_device(pick_device(s.cfg.device), w))
    return {"resuming": resuming}


def main(cfg: DumpConfig) -> dict[str, Any] | None:
    """The whole stage; returns a summary for the CLI to print (None on ranks other than 0).

    Under torchrun every rank runs this: rank 0 alone claims the cache (its lock is held by rank 0
    for the whole job, so a second job is still refused), then each rank dumps shards i with
    i % world == rank, and rank 0 writes the manifest once all exist. An --out URL is staged
    locally and published by `storage.staged`, which calls this again with the local folder (one
    process only: under torchrun the cache must be a folder every rank shares)."""
    w = distributed.world()
    if storage.is_url(cfg.out) and not cfg.dry_run:  # a dry run writes nothing
        distributed.agree(w, lambda: distributed.refuse_url(w, "--out", cfg.out))
        return storage.staged(cfg, main, writes={"out": "cache"})
    # one rank tokenises the whole corpus to count it; under torchrun the others are told
    s = distributed.agree(w, lambda: set_up(cfg, count=w.is_main))
    if w.distributed:
        told = distributed.broadcast(w, _counted(s) if w.is_main else None)
        s = distributed.agree(w, lambda: s if w.is_main else counted(s, told))
    configure("fp32", cfg.tf32)  # the teacher runner names its own precision
    if cfg.dry_run:
        return {"dry_run": dry_run(s)} if w.is_main else None
    with ExitStack() as held:
        claimed = distributed.agree(w, lambda: _claim(s, cfg, held, w) if w.is_main else None)
        claimed = distributed.broadcast(w, claimed)
        if "status" in claimed:
            return claimed if w.is_main else None
        m = run(s, w)
    if m is None:
        return None
    return {"cache": str(s.out), "status": "resumed" if claimed["resuming"] else "written",
            "shards": len(m.shards), "sequences": m.sequences, "rows": m.rows, "tokens": m.tokens,
            "bytes_per_token": m.bytes_per_token, "version": __version__}


@click.command("teacher-dump", epilog="Example: kdpipe teacher-dump --teacher ./bert-mlm "
               "--data wiki.txt --out caches/wiki --top-k 32 --temperatures 1,2,4. On a GPU: add "
               "--device cuda --precision bf16 --torch-compile (both recorded in the fingerprint).")
@config_option
@click.option("--teacher", help="Masked-LM checkpoint folder (or builtin:NAME).")
@click.option("--data", multiple=True, help="Text (any extension), JSONL, Parquet, CSV/TSV files, "
              "also .gz/.bz2/.xz/.zst, globs or folders; a save_to_disk or dataset repository folder; or a "
              "dataset name available offline; repeatable.")
@click.option("--out", help="Cache directory to create or resume, or a URL (s3://bucket/path, ...).")
@click.option("--text-column", help="Column holding the text (JSONL/Parquet/datasets). [text]")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), help="Precision of the teacher's "
              "forward pass; bf16/fp16 change the stored targets, and the cache's fingerprint records it. [fp32]")
@click.option("--tf32/--no-tf32", default=None, help="Let CUDA use TF32 for float32 matmuls (recorded in "
              "the fingerprint). [off]")
@compile_options("the teacher's forward pass (recorded in the fingerprint: inductor may change the stored "
                 "values in their last bits)")
@click.option("--data-split", help="Split of a named dataset, or of a save_to_disk DatasetDict or dataset "
              "repository folder. [train]")
@click.option("--format", type=click.Choice(list(corpus_mod.FORMATS)), help="What --data is, where its name "
              "does not say: text, json (lines), parquet, csv, tsv, disk (a save_to_disk folder), repo (a "
              "dataset repository folder). [auto: from the name; any other extension is text]")
@click.option("--seq-len", type=int, help="Tokens per sequence, [CLS]/[SEP] included. [128]")
@click.option("--packing", type=click.Choice(["pack", "line"]), help="pack: join documents into "
              "full sequences; line: one document per sequence, batches bucketed by length. [pack]")
@click.option("--max-sequences", type=int, help="Use only the first N sequences of the corpus.")
@click.option("--mask-prob", type=float, help="Share of tokens chosen for MLM. [0.15]")
@click.option("--mask-smoothing", type=float, help="Choose positions with p ~ count**-s; "
              "the reference uses 0.7. [0: uniform]")
@click.option("--mask-views", type=int, help="Independent mask draws per sequence. [1]")
@click.option("--seed", type=int, help="Seed of masks and projection. [0]")
@click.option("--targets", type=click.Choice(MODE_NAMES), help="What L_ce is made from: "
              f"{', '.join(m.summary for m in MODES.values())}. [{DEFAULT_MODE}]")
@click.option("--target-positions", type=click.Choice(["all", "masked"]), help="Store targets at "
              "every token or only at masked ones (restrict_ce_to_mask). [all]")
@click.option("--samples", type=int, help="Draws per position in the sampled mode. [32]")
@click.option("--top-k", type=int, help="Teacher logits kept per position. [32]")
@click.option("--temperatures", callback=floats_option, help="Temperature grid of the stored "
              "log-partition values, e.g. 1,2,4. [1,2,4]")
@click.option("--hidden-proj", type=click.Choice(["identity", "random", "pca"]),
              help="Projection of the teacher's last hidden state. [pca]")
@click.option("--hidden-dim", type=int, help="Width of the stored projection. [128; full for identity]")
@click.option("--hidden-layers", callback=ints_option, help="Also store the teacher's hidden states after "
              "these layers (0: the embeddings' output; the last is stored already), each through its own "
              "projection of --hidden-proj's kind and --hidden-dim's width, for student-train "
              "--alpha-layer-cos, e.g. 2,4. [none]")
@click.option("--relation-layer", type=int, help="Also store the outputs of this teacher layer's attention "
              "projections (1..N in --hidden-layers' numbering; N, the last, is MiniLM's), raw, for "
              "student-train --alpha-relation. [none]")
@click.option("--relation-parts", type=click.Choice(relation_targets.PART_CHOICES), help="Which projections "
              "--relation-layer stores: qkv (MiniLMv2's Q-Q, K-K, V-V relations; 6H bytes per token), v "
              "(MiniLM's value relation alone; 2H bytes), or another subset. [qkv]")
@click.option("--shard-size", type=int, help="Sequences per shard (the unit of resumption). [1024]")
@click.option("--batch-size", type=int, help="Sequences per teacher batch. [32]")
@click.option("--zstd-level", type=int, help="zstd level of the shards. [3]")
@click.option("--writers", type=int, help="Threads encoding, compressing and hashing shards (the "
              "bytes are the same whatever the number). [cores - 1, at least 1]")
@click.option("--device", help="auto, cpu, cuda, cuda:N. [auto]")
@click.option("--dry-run", is_flag=True, default=None, help="Estimate size and time; write nothing.")
def command(config_file: Path | None, **flags: Any) -> None:
    """Run the frozen teacher once over a corpus and write a distillation cache."""
    cfg = build_config(DumpConfig, config_file, flags)
    with distributed.joined(cfg.device):
        summary = main(cfg)
    if summary is not None:
        echo_json(summary)
