"""Benchmark: kdpipe's teacher dump against the bare teacher forward pass and a naive dump.

    python bench/teacher_dump.py                    # MiniLM- and BERT-base-sized teachers, ~5-8 min on 2 cores
    python bench/teacher_dump.py --quick            # smoke run, well under a minute
    python bench/teacher_dump.py --write-results    # also write the tables into bench/RESULTS.md

Run by hand, never by the tests. In one run, on the same batches (full-length packed sequences,
[CLS] random ids [SEP]), for each teacher size (random weights, vocab 30522):

- bare: `model(input_ids, attention_mask).logits`, the teacher's forward pass and nothing else:
  the physical limit of any dump.
- dump: what `kdpipe teacher-dump` does per shard: `pipeline.dump.dump_shard` (masking,
  padding, `TeacherRunner.run`: split head, chunked top-k and log-partition at every T, projected
  hidden states) + `shards.to_table` + `shards.write_shard` (zstd Parquet, fsync, atomic rename),
  one shard per batch, sequentially (the stage itself overlaps the write with the next forward
  pass, so this is the conservative number).
- naive: pad every sequence to full length, full (B, T, V) logits, a full log_softmax per
  temperature, top-k, Python lists, a pandas DataFrame, `to_parquet`.

The three are interleaved batch by batch (rotating which goes first), after a warm-up of each, so
a change of machine load hits all three alike. Then bytes per token on disk for k in {8, 16, 32,
64} and hidden width in {64, 128, 384} (MiniLM outputs), against full fp16 logits (V * 2 bytes).
Random weights: logits and hidden states are less peaked than a trained teacher's, so sizes are
indicative (see /work/shared/design.md for sizes measured with a trained MiniLM).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from results import RESULTS, machine, write_section  # bench/results.py (bench/ is on sys.path)

V = 30522
PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103  # bert-base-uncased ids
TEMPERATURES = (1.0, 2.0, 4.0)
SECTION = "## teacher-dump (issue 2)"


@dataclass(frozen=True)
class Size:
    name: str
    layers: int
    hidden: int
    heads: int
    target: float  # dump / bare


SIZES = {
    "minilm": Size("MiniLM-L6-H384", 6, 384, 12, 0.85),
    "bert-base": Size("BERT-base", 12, 768, 12, 0.93),
}


def make_teacher(size: Size, vocab: int = V, seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=size.hidden, num_hidden_layers=size.layers,
                     num_attention_heads=size.heads, intermediate_size=4 * size.hidden,
                     max_position_embeddings=512, pad_token_id=PAD)
    return BertForMaskedLM(cfg).eval()


def make_batches(n: int, batch: int, seq_len: int, seed: int = 0) -> list[list[np.ndarray]]:
    """n batches of full-length sequences, as packing gives: [CLS] ids [SEP]."""
    rng = np.random.default_rng(seed)
    return [[np.concatenate([[CLS], rng.integers(1000, V, size=seq_len - 2), [SEP]]).astype(np.int64)
             for _ in range(batch)] for _ in range(n)]


# ------------------------------------------------------------------------------------- methods

def to_tensors(seqs: list[np.ndarray], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = width or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.from_numpy(s)
        att[i, :len(s)] = 1
    return ids, att


class Bare:
    """The teacher's forward pass, logits and all; nothing is kept."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.inference_mode()
    def __call__(self, seqs: list[np.ndarray], ids: torch.Tensor, att: torch.Tensor, index: int) -> dict:
        self.model(input_ids=ids, attention_mask=att).logits
        return {}


class Dump:
    """kdpipe's per-shard path: dump_shard + to_table + write_shard (one shard per batch)."""

    def __init__(self, model: torch.nn.Module, hidden: int, k: int, dim: int, seq_len: int, batch: int,
                 out: Path) -> None:
        from kdpipe.pipeline import projection as proj
        from kdpipe.pipeline.masking import Vocabulary
        from kdpipe.pipeline.teacher import TeacherRunner
        from kdpipe.schemas.shard import shard_schema
        from kdpipe.stages.teacher_dump import DumpConfig, Setup

        cfg = DumpConfig(teacher="bench", data=["bench"], out=str(out), seq_len=seq_len, top_k=k,
                         temperatures=list(TEMPERATURES), hidden_proj="random", hidden_dim=dim,
                         batch_size=batch, shard_size=batch)
        vocab = Vocabulary(V, MASK, np.array([PAD, UNK, CLS, SEP, MASK], dtype=np.int64))
        self.setup = Setup(cfg=cfg, out=out, tokenizer=SimpleNamespace(pad_token_id=PAD), model=model,
                           model_config=model.config, corpus=None, vocab=vocab, pool=vocab.random_pool(),
                           n_sequences=0, n_tokens=0, weights=None, fingerprint={}, hidden_dim=dim, starts=[])
        self.runner = TeacherRunner(model, k, TEMPERATURES, proj.random_orthogonal(hidden, dim, 0),
                                    torch.device("cpu"))
        self.schema = shard_schema(V, k=k, n_temperatures=len(TEMPERATURES), hidden_dim=dim)
        self.out = out
        (out / "shards").mkdir(parents=True, exist_ok=True)

    def __call__(self, seqs: list[np.ndarray], ids: torch.Tensor, att: torch.Tensor, index: int) -> dict:
        from kdpipe.pipeline.shards import shard_path, stored_dtypes, to_table, write_shard
        from kdpipe.pipeline.dump import dump_shard

        t0 = time.perf_counter()
        data = dump_shard(self.setup.rows, self.runner, index * len(seqs), seqs, stored=stored_dtypes(self.schema))
        t1 = time.perf_counter()
        table = to_table(data, self.schema)
        t2 = time.perf_counter()
        write_shard(self.out / shard_path(index), table, "0" * 64, zstd_level=3)
        t3 = time.perf_counter()
        return {"teacher+mask": t1 - t0, "to_table": t2 - t1, "write": t3 - t2}


class Naive:
    """Pad to full length, full softmax per T over the full logits, Python lists, pandas."""

    def __init__(self, model: torch.nn.Module, hidden: int, k: int, dim: int, seq_len: int, out: Path) -> None:
        from kdpipe.pipeline import projection as proj

        self.model, self.k, self.seq_len, self.out = model, k, seq_len, out
        self.proj = proj.random_orthogonal(hidden, dim, 0)
        out.mkdir(parents=True, exist_ok=True)

    @torch.inference_mode()
    def __call__(self, seqs: list[np.ndarray], ids: torch.Tensor, att: torch.Tensor, index: int) -> dict:
        import pandas as pd

        ids, att = to_tensors(seqs, self.seq_len)  # every sequence padded to full length
        out = self.model(input_ids=ids, attention_mask=att, output_hidden_states=True)
        logits = out.logits  # (B, T, V)
        vals, top = logits.topk(self.k, dim=-1)  # (B, T, k)
        logp = {t: torch.log_softmax(logits / t, dim=-1).gather(-1, top) for t in TEMPERATURES}
        hidden = out.hidden_states[-1] @ self.proj  # (B, T, d)
        rows = []
        for b in range(len(seqs)):
            n = int(att[b].sum())
            row = {"seq_id": index * len(seqs) + b, "input_ids": ids[b, :n].tolist(),
                   "topk_ids": top[b, :n].tolist(), "topk_logits": vals[b, :n].tolist(),
                   "hidden": hidden[b, :n].tolist()}
            row.update({f"logp_T{t:g}": logp[t][b, :n].tolist() for t in TEMPERATURES})
            rows.append(row)
        pd.DataFrame(rows).to_parquet(self.out / f"naive-{index:05d}.parquet")
        return {}


# ------------------------------------------------------------------------------------ measuring

def measure(size: Size, n_batches: int, batch: int, seq_len: int, k: int, dim: int, work: Path) -> dict:
    model = make_teacher(size)
    methods = {"bare": Bare(model), "dump": Dump(model, size.hidden, k, dim, seq_len, batch, work / "dump"),
               "naive": Naive(model, size.hidden, k, dim, seq_len, work / "naive")}
    warm = make_batches(1, max(2, batch // 4), seq_len, seed=99)[0]
    for m in methods.values():
        m(warm, *to_tensors(warm), 10_000)
    batches = make_batches(n_batches, batch, seq_len, seed=1)
    seconds: dict[str, float] = defaultdict(float)
    parts: dict[str, float] = defaultdict(float)
    per_batch: list[float] = []  # dump / bare time per batch: robust to load that comes and goes
    names = list(methods)
    for i, seqs in enumerate(batches):
        ids, att = to_tensors(seqs)
        took = {}
        for name in names[i % 3:] + names[:i % 3]:  # rotate who goes first
            t0 = time.perf_counter()
            extra = methods[name](seqs, ids, att, i)
            took[name] = time.perf_counter() - t0
            seconds[name] += took[name]
            for key, v in extra.items():
                parts[key] += v
        per_batch.append(took["bare"] / took["dump"])
        print(f"  {size.name}: batch {i + 1}/{n_batches} "
              + " ".join(f"{n}={seconds[n]:.1f}s" for n in names), file=sys.stderr, flush=True)
    tokens = sum(len(s) for b in batches for s in b)
    tps = {n: tokens / seconds[n] for n in names}
    split = breakdown(model, methods["dump"].runner, batches[0])
    return {"size": size, "tokens": tokens, "tok_s": tps, "seconds": dict(seconds), "parts": dict(parts),
            "dump_bare": tps["dump"] / tps["bare"], "dump_naive": tps["dump"] / tps["naive"],
            "dump_bare_median": float(np.median(per_batch)), "breakdown": split}


@torch.inference_mode()
def breakdown(model: torch.nn.Module, runner, seqs: list[np.ndarray], repeats: int = 3) -> dict[str, float]:
    """Seconds for one batch (best of `repeats`): the bare pass, and the runner's parts: the
    encoder (model up to the decoder input), the decoder matmul in the runner's chunks, the
    top-k, and the rest of the reduction (exp and sums for log Z at every T)."""
    from kdpipe.pipeline.teacher import reduce_logits, topk

    ids, att = to_tensors(seqs)
    _, x = runner.hidden_and_decoder_input(ids, att)
    chunks = [x[i:i + runner.chunk] for i in range(0, x.shape[0], runner.chunk)]
    logits = lambda: [torch.addmm(runner.bias, c, runner.weight_t) for c in chunks]  # noqa: E731
    z = logits()
    parts = {
        "bare forward": lambda: model(input_ids=ids, attention_mask=att).logits,
        "encoder": lambda: runner.hidden_and_decoder_input(ids, att),
        "decoder matmul": logits,
        "top-k": lambda: [topk(c, runner.k) for c in z],
        "top-k + log Z": lambda: [reduce_logits(c.clone(), runner.k, runner.temperatures) for c in z],
        "copy (subtracted)": lambda: [c.clone() for c in z],
    }
    best = {name: float("inf") for name in parts}
    for _ in range(repeats):
        for name, f in parts.items():
            t0 = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t0)
    best["log Z"] = best.pop("top-k + log Z") - best.pop("copy (subtracted)") - best["top-k"]
    return best


def bytes_per_token(n_batches: int, batch: int, seq_len: int, ks: list[int], dims: list[int], work: Path
                    ) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], dict[str, float]]]:
    """One MiniLM pass at k = max(ks), full width; smaller k and widths are slices/projections of it
    (top-k is sorted, so the first k columns are the top-k)."""
    from kdpipe.pipeline import projection as proj
    from kdpipe.pipeline.shards import column_bytes, to_table, write_shard
    from kdpipe.schemas.shard import shard_schema
    from kdpipe.pipeline.dump import dump_shard

    size = SIZES["minilm"]
    model = make_teacher(size)
    dumper = Dump(model, size.hidden, max(ks), size.hidden, seq_len, batch, work / "sizes")
    dumper.runner.projection = proj.identity(size.hidden)
    parts = [dump_shard(dumper.setup.rows, dumper.runner, i * batch, seqs)
             for i, seqs in enumerate(make_batches(n_batches, batch, seq_len, seed=2))]
    full = replace(parts[0], **{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                                for f in fields(parts[0]) if getattr(parts[0], f.name) is not None})
    total, by_col = {}, {}
    for d in dims:
        q = proj.identity(size.hidden) if d == size.hidden else proj.random_orthogonal(size.hidden, d, 0)
        hidden = (torch.from_numpy(full.hidden) @ q).numpy()
        for k in ks:
            data = replace(full, topk_ids=full.topk_ids[:, :k], topk_logits=full.topk_logits[:, :k], hidden=hidden)
            path = work / "sizes" / f"k{k}-d{d}.parquet"
            write_shard(path, to_table(data, shard_schema(V, k=k, n_temperatures=len(TEMPERATURES), hidden_dim=d)), "0" * 64, zstd_level=3)
            total[(k, d)] = path.stat().st_size / data.tokens
            by_col[(k, d)] = {c: b / data.tokens for c, b in column_bytes(path).items()}
    return total, by_col


# ------------------------------------------------------------------------------------- reporting

def speed_table(results: list[dict]) -> str:
    lines = ["| teacher | tokens | bare forward tok/s | kdpipe dump tok/s | naive tok/s | dump/bare | "
             "median per batch | target | dump/naive |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s, t = r["size"], r["tok_s"]
        ok = "met" if r["dump_bare"] >= s.target else "MISSED"
        lines.append(f"| {s.name} ({s.layers}L, H{s.hidden}) | {r['tokens']:,} | {t['bare']:,.0f} | {t['dump']:,.0f} | "
                     f"{t['naive']:,.0f} | {r['dump_bare']:.3f} | {r['dump_bare_median']:.3f} | ≥ {s.target} ({ok}) | "
                     f"{r['dump_naive']:.2f}× |")
    lines += ["", "Where the dump's time goes (seconds over the timed batches):", "",
              "| teacher | bare forward | dump: teacher + masking + padding | dump: to_table | dump: write_shard |",
              "|---|---:|---:|---:|---:|"]
    for r in results:
        p = r["parts"]
        lines.append(f"| {r['size'].name} | {r['seconds']['bare']:.1f} | {p['teacher+mask']:.1f} | "
                     f"{p['to_table']:.2f} | {p['write']:.2f} |")
    names = list(results[0]["breakdown"])
    lines += ["", "Inside the teacher step, one batch (seconds, best of 3):", "",
              "| teacher | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for r in results:
        lines.append(f"| {r['size'].name} | " + " | ".join(f"{r['breakdown'][n]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def size_table(total: dict, by_col: dict, ks: list[int], dims: list[int]) -> str:
    full = V * 2
    head = "| k | " + " | ".join(f"hidden {d}" for d in dims) + " | of which top-k ids + logits | log Z (3 T) |"
    lines = [head, "|---:|" + "---:|" * (len(dims) + 2)]
    for k in ks:
        cells = [f"{total[(k, d)]:,.0f} B ({full / total[(k, d)]:,.0f}× smaller)" for d in dims]
        c = by_col[(k, dims[0])]
        lines.append(f"| {k} | " + " | ".join(cells) + f" | {c['topk_ids'] + c['topk_logits']:.0f} B | {c['log_z']:.1f} B |")
    hid = " · ".join(f"{d}: {by_col[(ks[0], d)]['hidden']:.0f} B" for d in dims)
    lines += ["", f"Full fp16 logits: {full:,} B per token (V · 2). Hidden state alone, by width: {hid}."]
    return "\n".join(lines)


NOTES = """Notes (how the dump got here; measured on this machine while optimising, 24 Nov 2026):

- The dump splits the masked-LM head at its decoder: the encoder and the decoder matmul are the bare
  pass's own work. The extra is the top-k and log Z at every T (the two right-hand columns above),
  plus masking, the Arrow table and the zstd write (~0.03 s a batch). The bare pass in turn pays
  for writing its (B, T, V) logits: 500 MB per 32 x 128 batch.
- Top-k: `torch.topk` over 30,522 logits cost ~25% of the bare pass. The blocked top-k (maxima of
  64-logit blocks, then `torch.topk` on the k best blocks) is exact and 1.4-2.7x faster.
- Each 1024-row chunk's logits go into one reused buffer: a fresh 125 MB tensor per chunk cost page
  faults on every chunk. 8 MiniLM batches, interleaved, idle machine: 17.6 s -> 15.5 s.
- `TeacherRunner.run` alone against the bare pass (MiniLM, best of 5, idle): 0.832 before these
  changes, 0.925 after the blocked top-k and 1024-row chunks (before the buffer).
- Tried and dropped: reducing in cache-sized blocks of 16 rows. A little faster on an idle
  machine, but 4-7x slower than the bare pass when another process shared the two cores (every
  small op's thread barrier waits for a descheduled thread); large chunks degrade gracefully.
- The machine is shared: the load average at the start and end of the run is given above, and
  the median of per-batch ratios is less sensitive to load that comes and goes than the total.
- Random weights, so sizes are indicative; design.md's trained-MiniLM figures (top-32 ids + fp16
  logits 99 B, hidden projected to 128: 244 B) are within 15% of these (101 B, 215 B)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny batches, a few seconds per teacher")
    ap.add_argument("--batches", type=int, default=8, help="timed batches, MiniLM [8]")
    ap.add_argument("--base-batches", type=int, default=4, help="timed batches, BERT-base [4]")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--hidden-dim", type=int, default=128)
    ap.add_argument("--sizes", default="minilm,bert-base", help="comma-separated: minilm, bert-base")
    ap.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    ap.add_argument("--write-results", action="store_true", help=f"write the tables into {RESULTS}")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batches, args.base_batches, args.batch_size, args.seq_len = 2, 1, 8, 64
    started = datetime.now(timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y")
    before = machine()
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-") as tmp:
        work = Path(tmp)
        results = []
        for name in args.sizes.split(","):
            n = args.batches if name == "minilm" else args.base_batches
            results.append(measure(SIZES[name], n, args.batch_size, args.seq_len, args.top_k,
                                   args.hidden_dim, work / name))
        ks, dims = [8, 16, 32, 64], [64, 128, 384]
        total, by_col = bytes_per_token(2 if not args.quick else 1, args.batch_size, args.seq_len, ks, dims,
                                        work)
    cmd = "python bench/teacher_dump.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        SECTION, "",
        f"`{cmd.strip()}` — {started}.",
        f"Machine: {before} at the start; {machine().split('load average ')[1]} at the end.",
        f"Batches of {args.batch_size} × {args.seq_len} full-length sequences; k = {args.top_k}, "
        f"T = {', '.join(f'{t:g}' for t in TEMPERATURES)}, hidden projected to {args.hidden_dim} (random "
        "orthogonal), zstd level 3. bare = `model(input_ids, attention_mask).logits`; dump = "
        "`dump_shard` + `to_table` + `write_shard`, one shard per batch, no overlap; naive = full "
        "logits, log_softmax per T, Python lists, pandas `to_parquet`. Interleaved batch by batch.", "",
        speed_table(results), "",
        "Bytes per token on disk (MiniLM-sized teacher, random weights; all columns: inputs, MLM labels, "
        "top-k ids (uint16) and logits (fp16), log Z (fp32, 3 T), hidden (fp16)):", "",
        size_table(total, by_col, ks, dims), "", NOTES, "",
    ])
    print(text)
    if args.write_results:
        write_section(SECTION, text)
        print(f"written to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
