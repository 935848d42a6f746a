"""Benchmark: what the loader's value checks (pipeline/values.py) cost, measured side by side.

    python bench/value_checks.py                  # about 2 minutes on 2 CPU cores
    python bench/value_checks.py --sequences 4000 --workdir /tmp/kdvalues

A cache at the sizes the design sizes defaults by (30,522-token vocabulary so ids span 16 bits,
top-32, 3 temperatures, 128-wide hidden targets, 128-token rows) is dumped once from a small
random BERT. Then, alternating in one process:
- per shard: decoding (Parquet -> flat arrays, what the loader does for every shard) against the
  cheap checks on the decoded arrays (what the loader adds), and the deep checks (verify --deep);
- the whole loader (`iter_batches`, one epoch, batches of 32 rows) with the checks on and off.
Each figure is the best of --repeats; the ratios are what counts.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
VOCAB = 30522


def make_teacher(folder: Path) -> Path:
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import WORDS

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + sorted(set(WORDS)) + [chr(c) for c in range(97, 123)] + [".", ","]
    (folder / "vocab.txt").write_text("\n".join(words + [f"[unused{i}]" for i in range(VOCAB - len(words))]) + "\n")
    tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=256, max_position_embeddings=256)
    BertForMaskedLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_cache(work: Path, sequences: int) -> Path:
    cache = work / "cache"
    if (cache / "manifest.json").is_file():
        return cache
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import WORDS

    teacher = make_teacher(work / "teacher")
    rnd = random.Random(0)
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(20, 60))) + " ."
                                for _ in range(sequences * 2)) + "\n")
    exe = Path(sys.executable).parent / "kdpipe"
    subprocess.run([str(exe), "teacher-dump", "--teacher", str(teacher), "--data", str(corpus), "--out", str(cache),
                    "--seq-len", "128", "--top-k", "32", "--temperatures", "1,2,4", "--hidden-dim", "128",
                    "--shard-size", "256", "--max-sequences", str(sequences), "--batch-size", "64"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cache


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path)
    p.add_argument("--sequences", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="kdpipe-values-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cache = make_cache(work, a.sequences)
    dump_s = time.perf_counter() - t0

    import torch

    torch.set_num_threads(1)
    from kdpipe.pipeline import values
    from kdpipe.pipeline.cache import load_manifest, open_shard
    from kdpipe.pipeline.loader import DataPosition, LoaderSpec, concat, iter_batches
    from kdpipe.pipeline.shards import iter_row_groups

    m = load_manifest(cache)
    lim = values.limits_of(m)
    paths = [open_shard(cache, e) for e in m.shards]  # hashed once, outside the timings
    decoded = [concat(list(iter_row_groups(p))) for p in paths]
    decode = best(lambda: [concat(list(iter_row_groups(p))) for p in paths], a.repeats)
    cheap = best(lambda: [values.check(d, lim, e.first_seq, e.num_seqs) for d, e in zip(decoded, m.shards)],
                 a.repeats)
    deep = best(lambda: [values.check(d, lim, e.first_seq, e.num_seqs, deep=True)
                         for d, e in zip(decoded, m.shards)], a.repeats)

    spec = LoaderSpec(seed=0, batch_size=32)

    def epoch() -> int:
        return sum(b.input_ids.shape[0] for b in iter_batches(cache, m, spec, DataPosition(0, 0), epochs=1))

    from kdpipe.pipeline import shards

    real_check, real_layout = values.check, shards._check_layout
    on, off = [], []
    for _ in range(a.repeats):  # alternated, so load drifts hit both arms alike
        values.check, shards._check_layout = real_check, real_layout
        on.append(best(epoch, 1))
        values.check = shards._check_layout = lambda *args, **kw: None  # every check this issue added
        off.append(best(epoch, 1))
    values.check, shards._check_layout = real_check, real_layout
    rows = m.rows
    load = os.getloadavg()
    print(f"cache: {len(m.shards)} shards, {rows} rows, {m.tokens} tokens, {m.bytes / m.tokens:.0f} B/token "
          f"(dumped in {dump_s:.0f} s); load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"per shard: decode {1e3 * decode / len(paths):.2f} ms, cheap checks {1e3 * cheap / len(paths):.2f} ms "
          f"({100 * cheap / decode:.1f}% of decode), deep checks {1e3 * deep / len(paths):.2f} ms "
          f"({100 * deep / decode:.1f}% of decode)")
    print(f"loader epoch: checks on {rows / min(on):.0f} rows/s, off {rows / min(off):.0f} rows/s, "
          f"on/off {min(off) / min(on):.3f}")


if __name__ == "__main__":
    main()
