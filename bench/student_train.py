"""Benchmark: offline distillation from a kdpipe cache vs online distillation (teacher at every step).

    python bench/student_train.py                 # about 5 minutes on 2 CPU cores
    python bench/student_train.py --steps 40 --batch-size 16 --seq-len 128 --workdir /tmp/kdbench

What it measures, in one run, each configuration in its own process (so peak RSS is its own):
- offline-1x / offline-8x: `student-train` (the kdpipe stage, in-process in the worker) from a
  cache and from a cache 8x as large: steps/s, tokens/s, the share of wall time spent waiting for a
  batch, peak RSS. Memory must be flat in the cache size: the 8x run reads more data than the whole
  1x cache holds, yet holds only a window of shards at a time.
- online-1x: what the DistilBERT reference does: the same student, the same batches (same input
  ids and masks), but the teacher runs forward at every step and L_ce is the full-vocabulary KL.

Teacher: MiniLM-sized BERT with random weights (6 layers, hidden 384, 12 heads, vocab 30522);
student: 3 layers initialised from teacher layers 0, 2, 4. Timings skip a warm-up window.
The caches are made by `kdpipe teacher-dump` (its time is reported: the one-off cost).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a of and to in is was for on with as by at from that it his her they film book city river "
         "music war king game team school water light year time first new old great small long high early "
         "late north south house road story life").split()
VOCAB = 30522


# ------------------------------------------------------------------------------------ fixtures

def make_teacher(folder: Path) -> Path:
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(97, 123)] + [f"##{chr(c)}" for c in range(97, 123)]
    words = specials + sorted(set(WORDS)) + letters + [".", ","]
    vocab = words + [f"[unused{i}]" for i in range(VOCAB - len(words))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512)
    BertForMaskedLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_corpus(path: Path, lines: int, seed: int = 0) -> Path:
    rnd = random.Random(seed)
    text = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(8, 40))) + " ." for _ in range(lines)]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def bench_env(threads: int) -> dict[str, str]:
    """Passive OpenMP waits: on a shared machine, spinning threads of two processes make each
    other several times slower, and the timings bimodal."""
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads),
                OMP_WAIT_POLICY="PASSIVE")


def kdpipe(*args: str | Path, threads: int) -> float:
    env = bench_env(threads)
    t0 = time.perf_counter()
    exe = shutil.which("kdpipe", path=str(Path(sys.executable).parent)) or "kdpipe"
    subprocess.run([exe, *map(str, args)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------- workers

def worker_offline(a: argparse.Namespace) -> dict:
    from kdpipe.stages.student_train import StudentConfig, main

    main(StudentConfig(cache=a.cache, out=a.out, teacher=a.teacher, student_layers=3, max_steps=a.steps,
                       batch_size=a.batch_size, temperature=2.0, log_every=a.window, save_every=10**9,
                       seed=0))
    lines = [json.loads(x) for x in (Path(a.out) / "metrics.jsonl").read_text().splitlines()][1:]
    return {"steps_per_s": sum(m["steps_per_s"] for m in lines) / len(lines),
            "tokens_per_s": sum(m["tokens_per_s"] for m in lines) / len(lines),
            "data_wait_pct": sum(m["data_wait_pct"] for m in lines) / len(lines)}


def worker_online(a: argparse.Namespace) -> dict:
    """The reference's step: student and teacher forward on the same batch, full-vocabulary KL."""
    import torch
    import torch.nn.functional as F

    from kdpipe.pipeline import student as stu
    from kdpipe.pipeline.cache import load_manifest
    from kdpipe.pipeline.loader import LoaderSpec, Position, iter_batches
    from kdpipe.pipeline.teacher import load_teacher
    from kdpipe.stages import student_train as st

    cache = Path(a.cache)
    manifest = load_manifest(cache)
    teacher = load_teacher(a.teacher)
    scfg = stu.student_config(teacher.config.to_dict(), layers=3)
    student = stu.build_student(scfg, seed=0)
    stu.init_from_teacher(student, teacher.state_dict(), stu.default_layer_map(6, 3))
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=st.REFERENCE_LR, betas=st.REFERENCE_BETAS,
                            eps=st.REFERENCE_ADAM_EPS, weight_decay=0.0)
    t_temp, (a_ce, a_mlm, a_cos) = 2.0, (5.0, 2.0, 1.0)
    spec = LoaderSpec(seed=0, window=4, batch_size=a.batch_size, temperature_index=1)
    inputs = []  # the same batches as offline; only the tokens are kept (online needs no cache)
    for b in iter_batches(cache, manifest, spec, Position(0, 0)):
        labels = torch.full(b.input_ids.shape, -100, dtype=torch.long)
        labels.view(-1)[b.attention_mask.view(-1).nonzero().squeeze(1)[b.mlm_index]] = b.mlm_labels
        inputs.append((b.input_ids, b.attention_mask, labels, b.tokens))
        if len(inputs) == a.steps:
            break
    times, tokens = [], []
    for ids, att, labels, n in inputs:
        t0 = time.perf_counter()
        s_out = student(input_ids=ids, attention_mask=att, output_hidden_states=True)
        with torch.no_grad():
            t_out = teacher(input_ids=ids, attention_mask=att, output_hidden_states=True)
        mask = att.bool()
        s_log, t_log = s_out.logits[mask], t_out.logits[mask]  # (N, V)
        loss_ce = F.kl_div(F.log_softmax(s_log / t_temp, -1), F.softmax(t_log / t_temp, -1),
                           reduction="batchmean") * t_temp ** 2
        loss_mlm = F.cross_entropy(s_out.logits.view(-1, s_out.logits.shape[-1]), labels.view(-1))
        s_h, t_h = s_out.hidden_states[-1][mask], t_out.hidden_states[-1][mask]
        loss_cos = (1 - F.cosine_similarity(s_h, t_h, dim=-1)).mean()
        loss = a_ce * loss_ce + a_mlm * loss_mlm + a_cos * loss_cos
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), st.REFERENCE_MAX_GRAD_NORM)
        opt.step()
        times.append(time.perf_counter() - t0)
        tokens.append(n)
    t, n = sum(times[a.window:]), sum(tokens[a.window:])
    return {"steps_per_s": (len(times) - a.window) / t, "tokens_per_s": n / t, "data_wait_pct": 0.0}


def run_worker(kind: str, threads: int, **kw: str | int) -> dict:
    """A worker in its own process; its peak RSS from wait4."""
    args = [sys.executable, __file__, "--worker", kind, "--threads", str(threads)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    env = bench_env(threads)
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise SystemExit(f"worker {kind} failed ({proc.returncode}): {text[-2000:]}")
    res = json.loads(text.strip().splitlines()[-1])
    res["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    return res


# ---------------------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path)
    p.add_argument("--steps", type=int, default=24, help="updates per configuration")
    p.add_argument("--window", type=int, default=4, help="warm-up/logging window (updates)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--sequences", type=int, default=64, help="sequences in the 1x cache")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (the prefetch thread "
                   "and the OS get the other core of a 2-core machine)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each configuration; the best is kept")
    p.add_argument("--worker", choices=["offline", "online"])
    p.add_argument("--cache")
    p.add_argument("--teacher")
    p.add_argument("--out")
    a = p.parse_args()
    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps((worker_offline if a.worker == "offline" else worker_online)(a)))
        return

    work = a.workdir or Path(tempfile.mkdtemp(prefix="kdbench-"))
    work.mkdir(parents=True, exist_ok=True)
    teacher = make_teacher(work / "teacher")
    dump = ("--seq-len", a.seq_len, "--top-k", 32, "--temperatures", "1,2,4", "--hidden-dim", 128,
            "--shard-size", 16, "--batch-size", 16)
    caches, dump_s = {}, {}
    for scale in (1, 8):
        n = a.sequences * scale
        corpus = make_corpus(work / f"corpus-{scale}x.txt", lines=n * a.seq_len // 12, seed=scale)
        caches[scale] = work / f"cache-{scale}x"
        dump_s[scale] = kdpipe("teacher-dump", "--teacher", teacher, "--data", corpus, "--out", caches[scale],
                               "--max-sequences", n, *dump, threads=a.threads)
    common = dict(teacher=teacher, steps=a.steps, batch_size=a.batch_size, window=a.window)
    runs = {"offline 1x": ("offline", dict(cache=caches[1], out=work / "run-1x")),
            "offline 8x": ("offline", dict(cache=caches[8], out=work / "run-8x")),
            "online 1x": ("online", dict(cache=caches[1]))}
    results: dict[str, dict] = {}
    for rep in range(a.repeats):  # interleaved, best of the repeats: the machine may be shared
        for name, (kind, kw) in runs.items():
            if "out" in kw:
                shutil.rmtree(kw["out"], ignore_errors=True)
            r = run_worker(kind, a.threads, **kw, **common)
            best = results.get(name)
            if best is None or r["steps_per_s"] > best["steps_per_s"]:
                results[name] = {**r, "peak_rss_mb": max(r["peak_rss_mb"], best["peak_rss_mb"] if best else 0)}
            else:
                best["peak_rss_mb"] = max(best["peak_rss_mb"], r["peak_rss_mb"])
    manifests = {s: json.loads((caches[s] / "manifest.json").read_text()) for s in caches}
    print(f"\nbatch {a.batch_size} x {a.seq_len} tokens, {a.steps} updates per run ({a.window} warm-up), "
          f"{a.threads} threads, best of {a.repeats}; caches: " + ", ".join(
              f"{s}x = {m['sequences']} seq, {m['bytes'] / 1e6:.1f} MB, {m['bytes_per_token']:.0f} B/token "
              f"(dump {dump_s[s]:.0f} s)" for s, m in manifests.items()))
    print(f"{'run':<12}{'steps/s':>9}{'tokens/s':>10}{'data wait %':>13}{'peak RSS MB':>13}")
    for name, r in results.items():
        print(f"{name:<12}{r['steps_per_s']:>9.3f}{r['tokens_per_s']:>10.0f}{r['data_wait_pct']:>13.2f}"
              f"{r['peak_rss_mb']:>13.0f}")
    off, on, big = results["offline 1x"], results["online 1x"], results["offline 8x"]
    reads_more = a.steps * a.batch_size > manifests[1]["rows"]
    print(f"\noffline / online: {off['steps_per_s'] / on['steps_per_s']:.2f}x steps/s, "
          f"{off['tokens_per_s'] / on['tokens_per_s']:.2f}x tokens/s")
    print(f"peak RSS 8x / 1x cache: {big['peak_rss_mb'] / off['peak_rss_mb']:.3f} "
          f"(the 8x run read {'more' if reads_more else 'less'} rows than the whole 1x cache holds)")
    print(json.dumps({"results": results, "dump_seconds": dump_s}, indent=None))


if __name__ == "__main__":
    main()
