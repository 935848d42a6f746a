"""Benchmark: `kdpipe teacher-dump` throughput with 1 and 2 processes (torchrun) on this machine.

    python bench/scale.py                    # MiniLM-sized teacher, 384 x 128 tokens, 2 repeats: ~5 min on 2 cores
    python bench/scale.py --quick            # smoke run, tiny teacher, about a minute
    python bench/scale.py --write-results    # also write the table into bench/RESULTS.md

Run by hand, never by the tests. Each configuration is the real CLI in a subprocess, timed wall
clock from start to exit (interpreter and torch start-up, teacher load, the tokenising pass that
counts the corpus, the dump, the manifest), on the same corpus and settings, into a fresh cache:

- 1 process, all threads: `kdpipe teacher-dump` with OMP_NUM_THREADS = cores (the usual run);
- 1 process, 1 thread: the same with OMP_NUM_THREADS=1 (one rank's share of the machine);
- N processes x 1 thread: `torchrun --standalone --nproc-per-node N kdpipe teacher-dump`.

The configurations are interleaved and their order rotated each repeat, so a change of machine
load hits all alike; the table gives the median wall time. The caches of the first repeat are
compared: the N-process cache must hold the same shard bytes as the 1-process one. Separately,
one tokenising pass over the corpus is timed: rank 0 makes one whole pass (the count in set-up),
then each rank tokenises only its own shards' texts (pipeline/corpus_index.py).
Random weights: the speed is that of a trained teacher of the same shape.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from results import RESULTS, machine, write_section  # bench/results.py (bench/ is on sys.path)

SECTION = "## Several processes (issue 7)"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_teacher(folder: Path, layers: int, hidden: int, heads: int, vocab: int) -> Path:
    """A random-weight BERT masked LM with a word-level vocabulary of `vocab` entries."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + [f"w{i}" for i in range(vocab - len(SPECIALS))]) + "\n")
    tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * hidden, max_position_embeddings=512)
    BertForMaskedLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_corpus(path: Path, tokens: int, vocab: int) -> Path:
    rnd = random.Random(0)
    lines, n = [], 0
    while n < tokens:
        k = rnd.randint(5, 40)
        lines.append(" ".join(f"w{rnd.randrange(vocab - len(SPECIALS))}" for _ in range(k)) + " .")
        n += k + 1
    path.write_text("\n".join(lines) + "\n")
    return path


def kdpipe() -> str:
    return shutil.which("kdpipe", path=str(Path(sys.executable).parent)) or "kdpipe"


def run_dump(label: str, procs: int, threads: int, args: list[str], out: Path) -> float:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads),
               PYTHONWARNINGS="ignore")
    cmd = [kdpipe(), "teacher-dump", *args, "--out", str(out)]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *cmd]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{label} failed:\n{proc.stderr[-3000:]}")
    print(f"  {label}: {wall:.1f} s", file=sys.stderr)
    return wall


def shard_hashes(cache: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((cache / "shards").iterdir())}


def tokenize_pass(teacher: Path, corpus: Path, seq_len: int) -> tuple[float, int]:
    """Seconds of one pass of the dump's tokeniser over the corpus, and the tokens it yields."""
    from kdpipe.pipeline import corpus as corpus_mod
    from kdpipe.pipeline.teacher import load_tokenizer

    tok = load_tokenizer(str(teacher))
    c = corpus_mod.resolve_corpus([str(corpus)], "text", "train")
    t0 = time.perf_counter()
    n = sum(len(s) for s in corpus_mod.iter_sequences(c, tok, seq_len, "pack"))
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2-layer H128 teacher, 64 sequences, 1 repeat")
    ap.add_argument("--sequences", type=int, default=384)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--procs", type=int, default=2, help="processes of the torchrun job [2]")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--write-results", action="store_true", help=f"write the table into {RESULTS}")
    args = ap.parse_args()
    layers, hidden, heads, vocab, name = 6, 384, 12, 30522, "MiniLM-sized (6L, H384, V 30522)"
    if args.quick:
        layers, hidden, heads, vocab, name = 2, 128, 2, 30522, "tiny (2L, H128, V 30522)"
        args.sequences, args.repeats = 64, 1
    cores = os.cpu_count() or 1
    started = datetime.now(timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y")
    before = machine()
    configs = [("1 process, %d threads" % cores, 1, cores), ("1 process, 1 thread", 1, 1),
               (f"{args.procs} processes × 1 thread (torchrun)", args.procs, 1)]
    walls: dict[str, list[float]] = {c[0]: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="kdpipe-scale-") as tmp:
        work = Path(tmp)
        teacher = make_teacher(work / "teacher", layers, hidden, heads, vocab)
        corpus = make_corpus(work / "corpus.txt", args.sequences * args.seq_len, vocab)
        dump = ["--teacher", str(teacher), "--data", str(corpus), "--seq-len", str(args.seq_len),
                "--max-sequences", str(args.sequences), "--shard-size", str(args.shard_size),
                "--batch-size", "32", "--top-k", "32", "--hidden-proj", "random", "--hidden-dim", "128"]
        first: dict[str, Path] = {}
        for rep in range(args.repeats):
            order = configs[rep % len(configs):] + configs[:rep % len(configs)]
            for label, procs, threads in order:
                out = work / f"cache-{rep}-{procs}-{threads}"
                walls[label].append(run_dump(label, procs, threads, dump, out))
                if rep == 0:
                    first[label] = out
                else:
                    shutil.rmtree(out)
        hashes = {label: shard_hashes(p) for label, p in first.items()}
        identical = len({tuple(sorted(h.items())) for h in hashes.values()}) == 1
        tok_s, tokens = tokenize_pass(teacher, corpus, args.seq_len)
    tokens = min(tokens, args.sequences * args.seq_len)
    base = statistics.median(walls[configs[0][0]])
    rows = ["| configuration | wall s (median) | tok/s | vs 1 process, all threads |", "|---|---:|---:|---:|"]
    for label, _, _ in configs:
        wall = statistics.median(walls[label])
        rows.append(f"| {label} | {wall:.1f} | {tokens / wall:,.0f} | {base / wall:.2f}× |")
    cmd = "python bench/scale.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        SECTION, "",
        f"`{cmd.strip()}` — {started}.",
        f"Machine: {before} at the start; {machine().split('load average ')[1]} at the end.",
        f"Teacher: {name}, random weights. Corpus: {args.sequences} packed sequences of {args.seq_len} tokens "
        f"({tokens:,} tokens), shards of {args.shard_size} sequences, teacher batches of 32, top-32, "
        f"T = 1, 2, 4, hidden projected to 128. Wall clock of the whole command (start-up included), "
        f"median of {args.repeats} interleaved repeat(s).", "",
        *rows, "",
        f"Shards of the {args.procs}-process cache byte-identical to the 1-process ones: "
        f"{'yes' if identical else 'NO'}. One tokenising pass over the corpus: {tok_s:.2f} s "
        f"({tok_s / base:.1%} of the 1-process wall time): rank 0 makes it whole (the count), then each rank "
        "tokenises only its own shards' texts.", "",
    ])
    print(text)
    if args.write_results:
        write_section(SECTION, text)
        print(f"written to {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
