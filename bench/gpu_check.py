"""The GPU path, checked: run by bench/gpu_check.sh on a machine with a CUDA device.

    python bench/gpu_check.py dump     # the stage's dump loop against the bare bf16 forward
    python bench/gpu_check.py train    # a short student-train on the device, its data-wait share

dump: for a MiniLM-sized and a BERT-base-sized teacher (random weights, vocab 30522), on the same
full-length packed batches, interleaved and best of 2: bare = `model(ids, att).logits` under
bf16 autocast, synchronised; dump = `stages.teacher_dump.dump_shards` with the CUDA
`TeacherRunner` (split head, top-k, log Z, projection; pinned non-blocking copies) and the
default pool of writer threads, every shard encoded, hashed and written. Target: dump / bare
>= 0.9. Also the host path alone (synthetic teacher, bench/host_pipeline.py) on this machine.
train: teacher-dump (CLI) of a small cache, then student-train on CUDA for a few hundred steps;
target: data wait < 5% of the wall time (metrics.jsonl's data_wait_pct, after the first window).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import host_pipeline as hp  # noqa: E402
from teacher_dump import SIZES, TEMPERATURES, V, make_teacher  # noqa: E402

K, DIM = 32, 128
PRECISION = "bf16"  # of both teacher passes (fp32 on a CPU smoke run)


def dump_vs_bare(size_name: str, shards: int, shard_size: int, batch: int, seq_len: int, writers: int,
                 dev: torch.device) -> dict:
    from kdpipe.pipeline import projection as proj
    from kdpipe.pipeline.device import autocast
    from kdpipe.pipeline.teacher import TeacherRunner
    from kdpipe.pipeline.writers import ShardWriters
    from kdpipe.schemas.shard import shard_schema
    from kdpipe.stages.teacher_dump import dump_shards

    size = SIZES[size_name]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model = make_teacher(size).to(dev)
    runner = TeacherRunner(model, K, TEMPERATURES, proj.random_orthogonal(size.hidden, DIM, 0), dev,
                           precision=PRECISION)
    seqs = hp.sequences(shards * shard_size, seq_len)
    tokens = sum(len(s) for s in seqs)
    batches = [seqs[i:i + batch] for i in range(0, len(seqs), batch)]
    tensors = [(torch.from_numpy(np.stack(b)).to(dev), torch.ones(len(b), seq_len, dtype=torch.long, device=dev))
               for b in batches]
    pool = ShardWriters(writers, shard_schema(V, k=K, n_temperatures=len(TEMPERATURES), hidden_dim=DIM), "0" * 64, 3)

    @torch.inference_mode()
    def bare() -> float:
        sync()
        t0 = time.perf_counter()
        with autocast(dev, PRECISION):  # as the runner's
            for ids, att in tensors:
                model(input_ids=ids, attention_mask=att).logits
        sync()
        return time.perf_counter() - t0

    def dump(out: Path, n: int | None = None) -> float:
        part = seqs[: n or len(seqs)]
        (out / "shards").mkdir(parents=True, exist_ok=True)
        for p in (out / "shards").glob("*.parquet"):
            p.unlink()
        t0 = time.perf_counter()
        dump_shards(hp.row_spec(batch), runner, hp.shard_chunks(part, shard_size), shard_size, out, pool)
        return time.perf_counter() - t0

    best = {"bare": float("inf"), "dump": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        bare()
        dump(Path(tmp), shard_size * writers)  # warm-up
        for r in range(2):
            for name in (("bare", "dump") if r % 2 == 0 else ("dump", "bare")):
                best[name] = min(best[name], bare() if name == "bare" else dump(Path(tmp)))
    pool.close()
    res = {"size": size.name, "tokens": tokens, "writers": writers,
           "bare_tok_s": tokens / best["bare"], "dump_tok_s": tokens / best["dump"]}
    res["dump_bare"] = res["dump_tok_s"] / res["bare_tok_s"]
    return res


def host_only(shards: int, shard_size: int, seq_len: int, batch: int, writers: int) -> float:
    seqs = hp.sequences(shards * shard_size, seq_len)
    teacher = hp.SyntheticTeacher(3 * shard_size * seq_len, K, DIM)
    pool = hp.writers(writers, K, DIM, 3)
    with tempfile.TemporaryDirectory() as tmp:
        hp.dump_path(seqs[: shard_size * writers], shard_size, batch, pool, Path(tmp) / "c", teacher)
        took = hp.dump_path(seqs, shard_size, batch, pool, Path(tmp) / "c", teacher)
    pool.close()
    return sum(len(s) for s in seqs) / took


def cmd_dump(args: argparse.Namespace) -> None:
    from kdpipe.pipeline.cores import default_workers

    writers = args.writers or default_workers()
    print(f"host path alone (synthetic teacher, {writers} writers): "
          f"{host_only(args.shards, args.shard_size, args.seq_len, args.batch_size, writers):,.0f} tok/s", flush=True)
    print("| teacher | tokens | writers | bare bf16 forward tok/s | dump tok/s | dump/bare | target |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    global PRECISION
    PRECISION = "bf16" if args.device.startswith("cuda") else "fp32"
    for name in args.sizes.split(","):
        r = dump_vs_bare(name, args.shards, args.shard_size, args.batch_size, args.seq_len, writers,
                         torch.device(args.device))
        ok = "met" if r["dump_bare"] >= 0.9 else "MISSED"
        print(f"| {r['size']} | {r['tokens']:,} | {writers} | {r['bare_tok_s']:,.0f} | {r['dump_tok_s']:,.0f} | "
              f"{r['dump_bare']:.3f} | ≥ 0.9 ({ok}) |", flush=True)


def cmd_train(args: argparse.Namespace) -> None:
    from student_train import make_corpus
    from student_train import make_teacher as make_teacher_folder

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    kd = [sys.executable, "-c", "from kdpipe.pipeline.cli import main; main()"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = make_teacher_folder(tmp / "teacher")
        corpus = make_corpus(tmp / "corpus.txt", lines=args.lines)
        t0 = time.perf_counter()
        subprocess.run([*kd, "teacher-dump", "--teacher", teacher, "--data", corpus, "--out", tmp / "cache",
                        "--seq-len", "128", "--device", "cuda", "--precision", "bf16", "--batch-size", "128",
                        "--shard-size", "512"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        print(f"teacher-dump (CLI, MiniLM size): {time.perf_counter() - t0:.1f} s", flush=True)
        man = json.loads((tmp / "cache" / "manifest.json").read_text())
        print(f"cache: {man['tokens']:,} tokens, {man['bytes_per_token']} B/token")
        subprocess.run([*kd, "student-train", "--cache", tmp / "cache", "--out", tmp / "run", "--device", "cuda",
                        "--batch-size", str(args.train_batch), "--max-steps", str(args.steps), "--log-every", "25",
                        "--save-every", str(10 * args.steps)], check=True, env=env, stdout=subprocess.DEVNULL)
        lines = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    print("| step | tokens/s | data wait % |")
    print("|---:|---:|---:|")
    for ln in lines:
        print(f"| {ln['step']} | {ln['tokens_per_s']:,.0f} | {ln['data_wait_pct']:.2f} |")
    later = lines[1:] or lines
    wait = float(np.mean([ln["data_wait_pct"] for ln in later]))
    print(f"data wait after the first window: {wait:.2f}% (target < 5%: {'met' if wait < 5 else 'MISSED'})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("dump")
    d.add_argument("--sizes", default="minilm,bert-base")
    d.add_argument("--shards", type=int, default=32)
    d.add_argument("--shard-size", type=int, default=512)
    d.add_argument("--batch-size", type=int, default=128)
    d.add_argument("--seq-len", type=int, default=128)
    d.add_argument("--writers", type=int, default=None, help="[cores - 1]")
    d.add_argument("--device", default="cuda", help="cpu: a smoke test of this script, not a measurement")
    t = sub.add_parser("train")
    t.add_argument("--lines", type=int, default=20000)
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--train-batch", type=int, default=128)
    args = ap.parse_args()
    if getattr(args, "device", "cuda") == "cuda" and not torch.cuda.is_available():
        sys.exit("Error: no CUDA device: bench/gpu_check.py measures the GPU path only")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"{gpu} · torch {torch.__version__} · {os.cpu_count()} CPU cores · "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    cmd_dump(args) if args.what == "dump" else cmd_train(args)


if __name__ == "__main__":
    main()
