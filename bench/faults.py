"""Fault-injection soak: SIGKILL every stage at random moments, rerun, compare with a clean run.

For each of teacher-dump, student-train, teacher-adapt and eval (tiny models and corpora built
with tests/helpers.py) this runs an uninterrupted reference once, then `--trials` times: start the
command as a subprocess, SIGKILL it after a seeded random delay drawn over the reference's
runtime, record which files existed at the kill, rerun to completion and compare the end state
with the reference:

- caches: every shard byte-identical, manifest identical apart from created_at/finished_at,
  the other cache files byte-identical;
- weights: every safetensors tensor equal;
- eval: report.json equal apart from timings and times, one part per unit;
- no temporary file (`.*.tmp`) left anywhere;
- nothing counted twice: metrics.jsonl steps strictly increasing and equal to the reference's.

A trial is a *loss* when the rerun fails or an output is missing, a *silent corruption* when the
rerun succeeds but the end state differs from the reference.

`--fault efbig` and `--fault enospc` replace the kill by a write that fails: a file-size limit
(RLIMIT_FSIZE, write() fails with EFBIG) drawn uniformly up to the reference's largest file, or a
real tmpfs (needs root) whose size is drawn uniformly up to the reference's footprint, so the disk
fills up at a random point (any shard, checkpoint, part). The failing run and the rerun are run in
this process (as `kdpipe_inproc` runs them in the tests: the same CLI code, no start-up cost). A
trial then also checks the failure: one `Error:` line naming a file of the output, no traceback,
and nothing partial under a final name (every shard byte-identical to the reference's, every
checkpoint complete by its own hashes, no manifest or final model but a whole one); then the
limit is lifted (the tmpfs grown) and the rerun is compared as above.

`--fault semantic` corrupts what a finished cache means, not its bytes (tests/tamper.py: a NaN or
infinity in a float column, an id or an MLM label at or past the vocabulary, a masked position
outside its row, a row whose counts disagree with its lists, a manifest fingerprint edited or a
shard footer swapped), each re-hashed into the manifest so the bytes verify. Every trial runs
`cache verify --deep` and `student-train` on the corrupted copy (in this process, as the tests
do): both must refuse with one `Error:` line and no traceback, no final/ may appear, and the
cache must be byte-identical afterwards.

    python bench/faults.py --trials 20 [--commands teacher-dump,eval] [--fault kill|efbig|enospc|semantic]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
                  PYTHONWARNINGS="ignore")

KDPIPE = shutil.which("kdpipe", path=str(Path(sys.executable).parent)) or "kdpipe"
DUMP = ("--seq-len", "32", "--shard-size", "4", "--top-k", "8", "--hidden-dim", "16",
        "--temperatures", "1,2", "--batch-size", "4")
TRAIN = ("--temperature", "2", "--batch-size", "8", "--seed", "0", "--epochs", "2",
         "--save-every", "3", "--log-every", "1")
TIMING_KEY = re.compile(r"(_at|_ms|_s|_per_s|_seconds|seconds|time|times|timing|timings|"
                        r"elapsed|duration|throughput|tokens_per_s|steps_per_s|data_wait_pct)$")
TIMESTAMPS = ("created_at", "finished_at")


def sh(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([KDPIPE, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def files(root: Path) -> list[str]:
    """Files under root; tolerant of a writer renaming folders while we walk."""
    for _ in range(20):
        try:
            return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) \
                if root.exists() else []
        except FileNotFoundError:
            continue
    return []


def temporaries(root: Path) -> list[str]:
    """Every temporary naming scheme: `.name.PID.tmp` files and folders, `.tmp-step-*`, `.final.tmp-*`."""
    return [p.relative_to(root).as_posix() for p in root.rglob(".*")
            if "tmp" in p.name] if root.exists() else []


# ------------------------------------------------------------------------------------ comparisons

def cmp_cache(ours: Path, ref: Path) -> list[str]:
    bad = []
    if not (ours / "manifest.json").exists():
        return [f"{ours}/manifest.json missing"]
    strip = lambda m: {k: v for k, v in m.items() if k not in TIMESTAMPS}  # noqa: E731
    if strip(json.loads((ours / "manifest.json").read_text())) != \
            strip(json.loads((ref / "manifest.json").read_text())):
        bad.append("manifest differs")
    a = {f for f in files(ours) if f not in ("manifest.json", ".lock")}
    b = {f for f in files(ref) if f not in ("manifest.json", ".lock")}
    if a != b:
        bad.append(f"files differ: extra {sorted(a - b)[:3]} missing {sorted(b - a)[:3]}")
    bad += [f"{f} differs" for f in sorted(a & b) if not same_file(ours / f, ref / f, ours, ref)]
    return bad


def same_file(a: Path, b: Path, ours: Path, ref: Path) -> bool:
    """Byte-identical, except that a JSON file may name its own output folder."""
    if a.suffix == ".json":  # and the code revision, which moves when anyone commits meanwhile
        return no_revision(load_json(a, ours, ref)) == no_revision(json.loads(b.read_text()))
    return sha(a) == sha(b)


def no_revision(obj):
    if isinstance(obj, dict):
        return {k: no_revision(v) for k, v in obj.items() if k != "code_revision"}
    if isinstance(obj, list):
        return [no_revision(v) for v in obj]
    return obj


def load_json(p: Path, ours: Path, ref: Path):
    return json.loads(p.read_text().replace(str(ours), str(ref)))


def cmp_tensors(a: Path, b: Path) -> list[str]:
    from safetensors.torch import load_file

    if not a.exists():
        return [f"{a} missing"]
    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        return [f"{a.name}: other tensor names"]
    return [f"{a.name}:{k} differs" for k in ta if not (ta[k].dtype == tb[k].dtype
                                                        and ta[k].shape == tb[k].shape
                                                        and bool((ta[k] == tb[k]).all()))]


def metric_steps(run: Path) -> list:
    p = run / "metrics.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append({"step": "TORN"})
    return out


def untimed(obj):
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items()
                if not TIMING_KEY.search(k) and k not in ("speed", "code_revision")}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def cmp_metrics(ours: Path, ref: Path) -> list[str]:
    a, b = metric_steps(ours), metric_steps(ref)
    steps = [m.get("step") for m in a]
    bad = []
    if any(not isinstance(s, int) for s in steps) or steps != sorted(set(steps)):
        bad.append(f"metrics steps not strictly increasing: {steps[:20]}")
    if untimed(a) != untimed(b):
        bad.append("metrics differ from the reference")
    return bad


# ------------------------------------------------------------------------------------ the commands

class Command:
    name: str
    done_marker: str

    def __init__(self, work: Path):
        self.work = work

    def args(self, out: Path) -> tuple:
        raise NotImplementedError

    def compare(self, out: Path, ref: Path) -> list[str]:
        raise NotImplementedError


class Dump(Command):
    name, done_marker = "teacher-dump", "manifest.json"

    def args(self, out):
        return ("teacher-dump", "--teacher", self.work / "teacher", "--data", self.work / "corpus.txt",
                "--out", out, *DUMP)

    def compare(self, out, ref):
        return cmp_cache(out, ref)


class Train(Command):
    name, done_marker = "student-train", "final/model.safetensors"

    def args(self, out):
        return ("student-train", "--cache", self.work / "cache", "--out", out, *TRAIN)

    def compare(self, out, ref):
        bad = []
        for f in ("model.safetensors", "kdpipe_hidden_map.safetensors"):
            if (ref / "final" / f).exists():
                bad += cmp_tensors(out / "final" / f, ref / "final" / f)
        return bad + cmp_metrics(out, ref)


class Adapt(Command):
    name, done_marker = "teacher-adapt", "model/model.safetensors"

    def args(self, out):
        c = self.work / "small.txt"
        return ("teacher-adapt", "--teacher", self.work / "encoder", "--data", c, "--out", out,
                "--heldout", c, "--heldout-sequences", "8", "--seq-len", "32", "--max-steps", "16",
                "--batch-size", "8", "--warmup-steps", "2", "--lr", "3e-3", "--save-every", "3")

    def compare(self, out, ref):
        bad = cmp_tensors(out / "model" / "model.safetensors", ref / "model" / "model.safetensors")
        if (ref / "cache").exists():
            bad += ["cache: " + x for x in cmp_cache(out / "cache", ref / "cache")]
        for sub in ("train", "run", ""):
            if (ref / sub / "metrics.jsonl").exists():
                bad += cmp_metrics(out / sub, ref / sub)
        return bad


class Eval(Command):
    name, done_marker = "eval", "report.json"

    def args(self, out):
        w = self.work
        return ("eval", "--teacher", w / "teacher", "--student", w / "run", "--task", w / "task.jsonl",
                "--heldout", w / "small.txt", "--out", out, "--seeds", "3", "--epochs", "1",
                "--batch-size", "8", "--lr", "1e-3", "--seq-len", "32", "--heldout-sequences", "16",
                "--speed-repeats", "2", "--speed-warmup", "1", "--speed-batch-size", "4",
                "--speed-seq-len", "16", "--max-train-examples", "40")

    def compare(self, out, ref):
        if not (out / "report.json").exists():
            return ["report.json missing"]
        bad = []
        if untimed(load_json(out / "report.json", out, ref)) != \
                untimed(json.loads((ref / "report.json").read_text())):
            bad.append("report.json differs")
        pa, pb = [f for f in files(out) if f.startswith("parts/")], \
            [f for f in files(ref) if f.startswith("parts/")]
        if pa != pb:
            bad.append(f"parts differ: {sorted(set(pa) ^ set(pb))[:4]}")
        for f in sorted(set(pa) & set(pb)):
            if f.endswith(".json") and "speed" not in f and \
                    untimed(load_json(out / f, out, ref)) != untimed(json.loads((ref / f).read_text())):
                bad.append(f"{f} differs")
        return bad


COMMANDS = {c.name: c for c in (Dump, Train, Adapt, Eval)}


def build_inputs(work: Path) -> None:
    from helpers import tiny_corpus, tiny_teacher
    from transformers import BertModel, BertTokenizerFast

    tiny_teacher(work / "teacher")
    tiny_corpus(work / "corpus.txt", lines=120)
    tiny_corpus(work / "small.txt", lines=40, seed=3)
    enc = work / "encoder"
    BertModel.from_pretrained(work / "teacher").save_pretrained(enc)
    BertTokenizerFast.from_pretrained(work / "teacher").save_pretrained(enc)
    rnd = random.Random(0)
    from helpers import WORDS
    with open(work / "task.jsonl", "w") as f:
        for i in range(60):
            label = ("pos", "neg")[i % 2]
            cue = "great light" if label == "pos" else "war old"
            f.write(json.dumps({"text": " ".join(rnd.choice(WORDS) for _ in range(5)) + " " + cue,
                                "label": label}) + "\n")


def reference(cmd: Command, out: Path) -> tuple[float, float]:
    """Run uninterrupted; (seconds until its first output file appeared, total seconds)."""
    t0 = time.monotonic()
    proc = subprocess.Popen([KDPIPE, *map(str, cmd.args(out))], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    first = None
    while proc.poll() is None:
        if first is None and out.exists() and any(p.is_file() for p in out.rglob("*")):
            first = time.monotonic() - t0
        time.sleep(0.01)
    total = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"reference {cmd.name} failed:\n{proc.stderr.read()}")
    return (first if first is not None else 0.0), total


def record(res: dict, log, out: Path) -> None:
    """Print and log a trial; a correct trial's output is removed (a failed one is kept to look at)."""
    print(json.dumps(res), flush=True)
    if log:
        log.write(json.dumps(res) + "\n")
        log.flush()
    if res["outcome"] == "correct":
        shutil.rmtree(out, ignore_errors=True)


def trial(cmd: Command, ref: Path, out: Path, delay: float, files_seen: int) -> dict:
    """Kill once `files_seen` files exist under `out` (then after `delay` s more), or, with
    files_seen 0, `delay` s after the start. Counting files rather than seconds hits the write
    phase wherever the machine's load puts it."""
    proc = subprocess.Popen([KDPIPE, *map(str, cmd.args(out))], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ))
    if files_seen:
        while proc.poll() is None and not (out.exists() and
                                           len(files(out)) >= files_seen):
            time.sleep(0.001)
    deadline = time.monotonic() + delay
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    hit = proc.poll() is None
    if hit:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    existed = files(out)
    hit = hit and cmd.done_marker not in existed
    where = {"files": len(existed), "tmp": sum(".tmp" in f for f in existed),
             "shards": sum(f.startswith("shards/") for f in existed),
             "checkpoints": len({f.split("/")[1] for f in existed if f.startswith("checkpoints/ckpt")}),
             "parts": sum(f.startswith("parts/") for f in existed),
             "manifest": "manifest.json" in existed}
    r = sh(*cmd.args(out))
    res = {"delay": round(delay, 2), "hit": hit, "at_kill": where, "rerun_rc": r.returncode}
    if r.returncode != 0:
        res["outcome"], res["why"] = "loss", (r.stderr.strip().splitlines() or ["?"])[-1]
        return res
    bad = cmd.compare(out, ref)
    left = temporaries(out)
    if left:
        bad.append(f"temporaries left: {left[:3]}")
    res["outcome"] = "correct" if not bad else "corruption"
    if bad:
        res["why"] = bad[:5]
    return res


# ------------------------------------------------------------------------------ write failures

def partial_cache(out: Path, ref: Path) -> list[str]:
    """What a failed dump left under final names must be complete: shards as the reference's."""
    bad = []
    for f in files(out):
        if f in (".lock",) or "tmp" in f:
            continue
        if f == "manifest.json":
            bad += cmp_cache(out, ref)
        elif not (ref / f).exists() or not same_file(out / f, ref / f, out, ref):
            bad.append(f"{f} under its final name differs from the reference")
    return bad


def partial_run(out: Path, ref: Path) -> list[str]:
    """Every checkpoint under its final name complete by its own hashes; `latest` names one;
    final/ absent or equal to the reference's."""
    bad = []
    ckpts = out / "checkpoints"
    for d in sorted(ckpts.glob("step-*")) if ckpts.is_dir() else []:
        try:
            meta = json.loads((d / "checkpoint.json").read_text())
            broken = [n for n, h in meta["files"].items() if not (d / n).is_file() or sha(d / n) != h]
        except (OSError, ValueError, KeyError):
            broken = ["checkpoint.json"]
        if broken:
            bad.append(f"{d.name} incomplete: {broken}")
    if (ckpts / "latest").is_file() and not (ckpts / (ckpts / "latest").read_text().strip()).is_dir():
        bad.append("latest names a missing checkpoint")
    if (out / "final").exists():
        bad += cmp_tensors(out / "final" / "model.safetensors", ref / "final" / "model.safetensors")
    return bad


def partial_outputs(cmd: Command, out: Path, ref: Path) -> list[str]:
    if isinstance(cmd, Dump):
        return partial_cache(out, ref)
    if isinstance(cmd, Train):
        return partial_run(out, ref)
    if isinstance(cmd, Adapt):
        bad = partial_cache(out / "cache", ref / "cache") if (out / "cache").exists() else []
        bad += partial_run(out / "run", ref / "run") if (out / "run").exists() else []
        if (out / "model").exists():
            bad += cmp_tensors(out / "model" / "model.safetensors", ref / "model" / "model.safetensors")
        return bad
    bad = []
    for f in files(out):
        if f.endswith(".json") and "tmp" not in f:
            try:
                json.loads((out / f).read_text())
            except ValueError:
                bad.append(f"{f} is not whole JSON")
    if (out / "report.json").exists():
        bad += cmd.compare(out, ref)
    return bad


def inproc(*args) -> subprocess.CompletedProcess:
    """`kdpipe ARGS` through click's runner in this process (real CLI code; a traceback of an
    uncaught exception is put on stderr, as a terminal would show it)."""
    import traceback

    from click.testing import CliRunner

    from kdpipe.pipeline.cli import cli

    r = CliRunner().invoke(cli, [str(a) for a in args], prog_name="kdpipe")
    err = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        err += "".join(traceback.format_exception(r.exception))
    return subprocess.CompletedProcess(args, r.exit_code, r.stdout, err)


def footprint(root: Path) -> int:
    """Bytes on a tmpfs: whole 4 KiB pages per file."""
    return sum(-(-(root / f).stat().st_size // 4096) * 4096 for f in files(root))


def disk_trial(cmd: Command, ref: Path, out: Path, fault: str, size: int) -> dict:
    """Run once with writes failing past `size` (file-size limit, or a tmpfs of that size), check
    the failure, lift the limit, rerun, compare."""
    import resource

    if fault == "enospc":
        out.mkdir(parents=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "kdpipe-faults", str(out)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"cannot mount a tmpfs (root needed): {r.stderr.strip()}")
        run_out = out / "out"
        first = inproc(*cmd.args(run_out))
    else:
        run_out = out
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
        try:
            first = inproc(*cmd.args(run_out))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    errors = [ln for ln in first.stderr.splitlines() if ln.startswith("Error:")]
    res = {"fault": fault, "size": size, "first_rc": first.returncode,
           "error": errors[-1][:200] if errors else None}
    bad = []
    if first.returncode != 0:
        said = errors[0] if len(errors) == 1 else ""
        res["one_line"] = ("Traceback" not in first.stderr and len(errors) == 1
                           and ("no space left" in said or "file too large" in said) and str(run_out) in said)
        if not res["one_line"]:
            bad.append("not a one-line error naming a file: " + (first.stderr.strip().splitlines() or ["?"])[-1][:200])
        res["partial"] = partial_outputs(cmd, run_out, ref)
        bad += res["partial"]
        res["tmp_after_failure"] = len(temporaries(run_out))
    if fault == "enospc":
        subprocess.run(["mount", "-o", "remount,size=256m", str(out)], check=True)
    r = inproc(*cmd.args(run_out))
    res["rerun_rc"] = r.returncode
    if r.returncode != 0:
        res["outcome"], res["why"] = "loss", (r.stderr.strip().splitlines() or ["?"])[-1][:300]
    else:
        bad += cmd.compare(run_out, ref)
        left = temporaries(run_out)
        if left:
            bad.append(f"temporaries left: {left[:3]}")
        res["outcome"] = "correct" if not bad else "corruption"
        if bad:
            res["why"] = bad[:5]
    if fault == "enospc":
        subprocess.run(["umount", "-l", str(out)], capture_output=True)
    return res


def disk_soak(a: argparse.Namespace, work: Path, rng: random.Random, log) -> list[str]:
    """--fault efbig|enospc: the table rows."""
    import torch

    torch.set_num_threads(1)
    rows = []
    for name in a.commands.split(","):
        cmd = COMMANDS[name](work)
        prepare(name, work)
        ref = work / f"ref-{name}"
        if not (ref / cmd.done_marker).exists():
            shutil.rmtree(ref, ignore_errors=True)
            reference(cmd, ref)
        biggest = max((ref / f).stat().st_size for f in files(ref))
        c = {"trials": 0, "failed": 0, "one_line": 0, "partial": 0, "tmp_left": 0, "correct": 0,
             "loss": 0, "corruption": 0}
        for i in range(a.trials):
            out = work / f"{a.fault}-{name}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            size = rng.randint(1, biggest) if a.fault == "efbig" else rng.randint(1, footprint(ref) // 4096) * 4096
            res = disk_trial(cmd, ref, out, a.fault, size)
            res.update(command=name, trial=i)
            c["trials"] += 1
            c["failed"] += res["first_rc"] != 0
            c["one_line"] += bool(res.get("one_line"))
            c["partial"] += bool(res.get("partial"))
            c["tmp_left"] += bool(res.get("tmp_after_failure"))
            c[res["outcome"]] += 1
            record(res, log, out)
        what = "file-size limit 1 B .. largest file" if a.fault == "efbig" else "tmpfs of 4 KiB .. the output's size"
        rows.append(f"| {name} | {a.fault} ({what}) | {c['trials']} | {c['failed']} | {c['one_line']} | "
                    f"{c['partial']} | {c['tmp_left']} | {c['correct']} | {c['loss']} | {c['corruption']} |")
    return ["| command | fault | trials | runs that failed | with a one-line error naming the file | "
            "partial output under a final name | temporaries left by the failed run | correct resumes | "
            "losses | silent corruptions |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", *rows]


def semantic_soak(a: argparse.Namespace, work: Path, rng: random.Random, log) -> list[str]:
    """--fault semantic: per kind, `--trials` corrupted copies of the reference cache through
    `cache verify --deep` and `student-train`; the table rows."""
    import torch

    import tamper

    torch.set_num_threads(1)
    prepare("student-train", work)
    rows = []
    for kind in tamper.KINDS:
        c = {"trials": 0, "verify": 0, "train": 0, "silent": 0, "traceback": 0, "changed": 0, "multi": 0}
        for i in range(a.trials):
            out = work / f"semantic-{kind}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            cache = Path(shutil.copytree(work / "cache", out / "cache"))
            done = tamper.corrupt(cache, kind, rng)
            before = {f: sha(cache / f) for f in files(cache)}
            deep = inproc("cache", "verify", "--deep", cache)
            run = out / "run"
            train = inproc("student-train", "--cache", cache, "--out", run, *TRAIN)
            res = {"kind": kind, "trial": i, "what": done["what"], "verify_rc": deep.returncode,
                   "train_rc": train.returncode, "final": (run / "final").exists()}
            for name, r in (("verify", deep), ("train", train)):
                errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error:")]
                res[f"{name}_error"] = errors[-1][:300] if errors else None
                c[name] += r.returncode != 0
                c["traceback"] += "Traceback" in r.stderr
                c["multi"] += r.returncode != 0 and len(errors) != 1
            c["silent"] += train.returncode == 0 or res["final"]
            c["changed"] += {f: sha(cache / f) for f in files(cache)} != before
            c["trials"] += 1
            ok = deep.returncode != 0 and train.returncode != 0 and not res["final"] and \
                "Traceback" not in deep.stderr + train.stderr
            res["outcome"] = "correct" if ok and {f: sha(cache / f) for f in files(cache)} == before else "corruption"
            record(res, log, out)
        rows.append(f"| {kind} | {c['trials']} | {c['verify']} | {c['train']} | {c['silent']} | {c['traceback']} | "
                    f"{c['multi']} | {c['changed']} |")
    return ["| semantic fault | trials | refused by `cache verify --deep` | refused by `student-train` | "
            "silent trainings | tracebacks | refusals not one `Error:` line | caches changed |",
            "|---|---:|---:|---:|---:|---:|---:|---:|", *rows]


def prepare(name: str, work: Path) -> None:
    """The inputs a command needs beyond build_inputs: a cache, a trained run."""
    if name in ("student-train", "eval") and not (work / "cache" / "manifest.json").exists():
        reference(Dump(work), work / "cache")
    if name == "eval" and not (work / "run" / "final").exists():
        reference(Train(work), work / "run")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--commands", default=",".join(COMMANDS))
    ap.add_argument("--work", type=Path, default=None, help="keep everything here (default: a temp dir)")
    ap.add_argument("--log", type=Path, default=None, help="write every trial as JSON lines here")
    ap.add_argument("--write-results", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--fault", choices=("kill", "efbig", "enospc", "semantic"), default="kill",
                    help="SIGKILL at a random point, a write failing past a random size, or a cache whose "
                         "values are corrupted and re-hashed")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="kdpipe-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    if not (work / "teacher").exists():
        build_inputs(work)
    rng = random.Random(a.seed)
    rows = []
    log = open(a.log, "a") if a.log else None
    if a.fault == "semantic":
        table = semantic_soak(a, work, rng, log)
        print("\n".join(table))
        if a.write_results:
            load = os.getloadavg()
            with open(ROOT / "bench" / "RESULTS.md", "a") as f:
                f.write(f"\n## Semantic corruption (issue 14)\n\n`python bench/faults.py --fault semantic --trials "
                        f"{a.trials} --seed {a.seed}` — started {started:%a %b %d %H:%M:%S UTC %Y}, load average "
                        f"at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 cores).\n"
                        "Each trial corrupts one value, count or fingerprint of a copy of the reference cache "
                        "(tests/tamper.py), re-hashes it into the manifest, then runs `cache verify --deep` and "
                        "`student-train` on it; a silent training is an exit 0 or a final/ model, a changed "
                        "cache one whose bytes differ after both.\n\n" + "\n".join(table) + "\n")
        return
    if a.fault != "kill":
        print("\n".join(disk_soak(a, work, rng, log)))
        return
    for name in a.commands.split(","):
        cmd = COMMANDS[name](work)
        prepare(name, work)
        ref = work / f"ref-{name}"
        shutil.rmtree(ref, ignore_errors=True)
        first, runtime = reference(cmd, ref)
        counts = {"trials": 0, "hit": 0, "partial": 0, "correct": 0, "loss": 0, "corruption": 0}
        for i in range(a.trials):
            out = work / f"trial-{name}-{i}"
            shutil.rmtree(out, ignore_errors=True)
            # 4 in 5 while output is being written (shards, checkpoints, parts), 1 in 5 before
            if rng.random() < 0.8:
                res = trial(cmd, ref, out, rng.uniform(0, 0.05), rng.randint(1, len(files(ref))))
            else:
                res = trial(cmd, ref, out, rng.uniform(0.3, max(0.3, first)), 0)
            res.update(command=name, trial=i)
            counts["trials"] += 1
            counts["hit"] += res["hit"]
            counts["partial"] += res["hit"] and res["at_kill"]["files"] > 0
            counts[res["outcome"]] += 1
            record(res, log, out)
        rows.append((name, runtime, first, counts))
    table = ["| command | reference run (s) | first output at (s) | trials | kills that hit mid-run | of which with output partly written | correct resumes | losses | silent corruptions |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {n} | {t:.1f} | {f:.1f} | {c['trials']} | {c['hit']} | {c['partial']} | {c['correct']} | {c['loss']} | {c['corruption']} |"
              for n, t, f, c in rows]
    print("\n".join(table))
    if a.write_results:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## Fault injection (issue 6)\n\n`python bench/faults.py --trials {a.trials} "
                    f"--seed {a.seed}` — started {started:%a %b %d %H:%M:%S UTC %Y}.\n"
                    "Each trial: SIGKILL (4 in 5) 0-50 ms after the n-th output "
                    "file appeared, n uniform over the reference's file count (shards, checkpoints, parts, "
                    "temporaries), or (1 in 5) at a time uniform between 0.3 s and the reference's first "
                    "output, rerun to completion, compare with the reference "
                    "(shards and manifest bytes, safetensors tensors, report.json without timings, "
                    "metrics steps, parts, no `.*.tmp`). A kill that 'hit mid-run' found the process "
                    "alive and its final output absent.\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
