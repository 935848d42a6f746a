"""Benchmark: what --torch-compile (inductor) does to a CPU student-train step and a dump forward.

    python bench/compile.py                      # about 10 minutes on 2 CPU cores, most of it compiling
    python bench/compile.py --steps 8 --batch-size 8 --seq-len 128 --workdir /tmp/kdcompile

In one process, side by side:
- dump: `TeacherRunner.run` (the teacher forward up to the decoder input, then the float32 decoder,
  top-k and log-partition reductions, which are not compiled) on the same padded batch, eager and
  compiled, calls alternated; also the forward alone (`_forward`), where compiling acts.
- train: `trainer.train_step` (forward, the three losses, backward, clipping, AdamW) of two
  students built alike (same seed, same teacher-layer init) from the same cache, one eager and one
  with its body and head compiled, steps alternated.
The first compiled call of each is reported apart as the compile time (its seconds minus an eager
call's); medians are over the timed calls after it. Teacher: a MiniLM-sized BERT with random
weights (6 layers, hidden 384, vocab 30522); student: 3 layers from teacher layers 0, 2, 4.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import student_train as sb  # noqa: E402  (its MiniLM-sized teacher and corpus)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_dump(teacher: str, batch: int, seq_len: int, repeats: int, backend: str, mode: str | None) -> dict:
    import torch

    from kdpipe.pipeline.compiling import Compile
    from kdpipe.pipeline.teacher import TeacherRunner, load_teacher

    model = load_teacher(teacher).eval()
    proj = torch.eye(384)[:, :128]
    runners = {"eager": TeacherRunner(model, 32, (1.0, 2.0, 4.0), proj, torch.device("cpu")),
               "compiled": TeacherRunner(model, 32, (1.0, 2.0, 4.0), proj, torch.device("cpu"),
                                         compile_spec=Compile(backend, mode))}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 30000, (batch, seq_len), generator=g)
    att = torch.ones_like(ids)
    first = {k: timed(lambda r=r: r.run(ids, att)) for k, r in runners.items()}
    out = {}
    for what, call in (("run", lambda r: r.run(ids, att)),
                       ("forward", lambda r: torch.inference_mode()(r._forward)(ids, att))):
        times = {k: [] for k in runners}
        for _ in range(repeats):
            for k, r in runners.items():
                times[k].append(timed(lambda r=r: call(r)))
        med = {k: statistics.median(v) for k, v in times.items()}
        out[what] = {"eager_s": round(med["eager"], 4), "compiled_s": round(med["compiled"], 4),
                     "speedup": round(med["eager"] / med["compiled"], 3)}
    a, b = (r.run(ids, att) for r in runners.values())
    out["compile_s"] = round(first["compiled"] - out["run"]["eager_s"], 1)
    out["max_abs_logit_diff"] = float(abs(a.topk_logits - b.topk_logits).max())
    out["topk_ids_equal"] = bool((a.topk_ids == b.topk_ids).all())
    out["tokens_per_call"] = batch * seq_len
    return out


def bench_train(cache: str, teacher: str, batch: int, steps: int, backend: str, mode: str | None) -> dict:
    import torch

    from kdpipe.pipeline.trainer import train_step
    from kdpipe.schemas.checkpoint import Position
    from kdpipe.stages import student_train as st

    cfgs = {k: st.StudentConfig(cache=cache, out="unused", teacher=teacher, student_layers=3, batch_size=batch,
                                temperature=2.0, max_steps=10 ** 6, seed=0, prefetch=0,
                                **({"torch_compile_backend": backend, "torch_compile_mode": mode}
                                   if k == "compiled" else {}))
            for k in ("eager", "compiled")}
    setups = {k: st.set_up(c) for k, c in cfgs.items()}
    state = st._load_teacher_checked(setups["eager"])
    trainers = {k: st._trainer(s, state) for k, s in setups.items()}
    streams = {k: st.open_stream(s, Position(0, 0)) for k, s in setups.items()}

    def step(k: str, seed: int) -> dict:
        s = setups[k]
        torch.manual_seed(seed)  # the same dropout draws for both students (where the backend keeps torch's RNG)
        return train_step(trainers[k], streams[k], st.loss_spec(s), s.teacher_head, s.optim, 1e-4, s.device,
                          False).sums

    first = {k: timed(lambda k=k: step(k, 0)) for k in ("eager", "compiled")}
    times = {"eager": [], "compiled": []}
    losses = {"eager": [], "compiled": []}
    for i in range(steps):
        for k in times:
            t0 = time.perf_counter()
            losses[k].append(step(k, i + 1)["loss"])
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"eager_step_s": round(med["eager"], 3), "compiled_step_s": round(med["compiled"], 3),
            "speedup": round(med["eager"] / med["compiled"], 3),
            "compile_s": round(first["compiled"] - first["eager"], 1),
            "max_rel_loss_diff": max(abs(a - b) / abs(a) for a, b in zip(losses["eager"], losses["compiled"])),
            "tokens_per_step": batch * setups["eager"].manifest.seq_len, "torch_threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path)
    p.add_argument("--steps", type=int, default=8, help="timed updates per student, after the compiling one")
    p.add_argument("--repeats", type=int, default=5, help="timed dump calls per runner")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--mode", default=None)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(a.threads)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="kdcompile-"))
    work.mkdir(parents=True, exist_ok=True)
    teacher = work / "teacher"
    if not (teacher / "config.json").exists():
        sb.make_teacher(teacher)
    cache = work / "cache"
    if not (cache / "manifest.json").exists():
        corpus = sb.make_corpus(work / "corpus.txt", lines=400)
        sb.kdpipe("teacher-dump", "--teacher", teacher, "--data", corpus, "--out", cache, "--seq-len", a.seq_len,
                  "--max-sequences", 4 * a.batch_size * (a.steps + 2), "--top-k", 32, "--hidden-dim", 128,
                  "--shard-size", 64, "--batch-size", 16, threads=a.threads)
    load = os.getloadavg()
    result = {"backend": a.backend, "mode": a.mode, "threads": a.threads,
              "dump": bench_dump(str(teacher), a.batch_size, a.seq_len, a.repeats, a.backend, a.mode),
              "train": bench_train(str(cache), str(teacher), a.batch_size, a.steps, a.backend, a.mode),
              "loadavg_before": [round(x, 2) for x in load],
              "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
