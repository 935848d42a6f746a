"""Several processes: real `torchrun --nproc-per-node 2` jobs on CPU (gloo), no mocks.

A two-rank dump whose rank 1 is killed with SIGKILL is rerun, redoes only the missing shards and
ends byte for byte equal to the one-rank reference cache; a refusal on one rank is one `Error:`
line; two-rank DDP training follows the one-rank loss trajectory of the same global batch and
resumes from its checkpoint on one or two ranks without skipping or repeating a row.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kdpipe.pipeline import distributed
from kdpipe.pipeline.fsutil import exclusive_lock

pytestmark = pytest.mark.slow

KDPIPE = shutil.which("kdpipe", path=str(Path(sys.executable).parent)) or "kdpipe"
# --standalone: a free local port, so jobs running side by side do not meet
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", KDPIPE)
# dropout 0: ranks draw other dropout masks than one process, so only then can trajectories match
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
# 165 rows in batches of 4: each epoch ends with a batch of one row (rank 1 holds a stand-in row
# weighted 0); two batches per update exercise no_sync. 21 updates, checkpoints at 8 and 16.
TRAIN = ("--temperature", "1.5", "--batch-size", "4", "--grad-accum", "2", "--epochs", "1", "--seed", "0",
         "--save-every", "8", "--log-every", "1", "--record-samples")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    return env


def torchrun(*args: str | Path, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run([*TORCHRUN, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=_env())
    if check:
        assert proc.returncode == 0, f"torchrun kdpipe {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_digest(cache: Path) -> dict[str, str]:
    """Every file's hash, but run_info.json (it records --out) and the manifest's timestamps."""
    out = {p.relative_to(cache).as_posix(): sha256(p) for p in sorted(cache.rglob("*"))
           if p.is_file() and p.name not in ("run_info.json", "manifest.json", ".lock")}
    m = json.loads((cache / "manifest.json").read_text())
    out["manifest.json"] = json.dumps({k: v for k, v in m.items() if k not in ("created_at", "finished_at")},
                                      sort_keys=True)
    return out


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------ unit

def test_world_from_environment_and_shares(monkeypatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.from_env() == distributed.World(0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    w = distributed.from_env()
    assert (w.rank, w.size, w.local_rank, w.is_main) == (3, 4, 1, False)
    assert [i for i in range(10) if w.owns_shard(i)] == [3, 7]
    # contiguous shares of a global batch cover it exactly once, whatever its size
    for rows in range(0, 11):
        parts = [distributed.World(r, 4).part(rows) for r in range(4)]
        assert parts[0][0] == 0 and parts[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(Exception, match="RANK=4 and WORLD_SIZE=4"):
        distributed.from_env()


# ------------------------------------------------------------------------------------ dump

def _workers(parent: int) -> dict[int, int]:
    """rank -> pid of the worker processes `parent` (torchrun) started."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        rank = [int(kv[5:]) for kv in env if kv.startswith(b"RANK=")]
        if rank:
            found[rank[0]] = int(d.name)
    return found


def test_two_rank_dump_equals_one_rank_and_a_killed_rank_redoes_only_its_missing_shards(
        tmp_path, reference_cache, teacher_dir, corpus_file, dump_args) -> None:
    """Rank 1 is killed (SIGKILL) once it has written a shard; torchrun stops the job; the rerun
    skips every finished shard and ends byte-identical to the one-process reference cache."""
    out = tmp_path / "cache"
    proc = subprocess.Popen([*TORCHRUN, "teacher-dump", "--teacher", str(teacher_dir), "--data",
                             str(corpus_file), "--out", str(out), *dump_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.monotonic() + 120
    try:
        while not list((out / "shards").glob("shard-*[13579].parquet")):  # a shard of rank 1
            assert proc.poll() is None, "the job ended before rank 1 wrote a shard"
            assert time.monotonic() < deadline, "rank 1 wrote no shard in 120 s"
            time.sleep(0.005)
        os.kill(_workers(proc.pid)[1], signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode != 0, "torchrun ends the job when a rank dies"
    assert not (out / "manifest.json").exists()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "shards").glob("shard-*.parquet")}
    assert 1 <= len(kept) < 83

    rerun = json.loads(torchrun("teacher-dump", "--teacher", teacher_dir, "--data", corpus_file,
                                "--out", out, *dump_args).stdout)  # rank 0 alone prints its summary
    assert rerun["status"] == "resumed" and rerun["shards"] == 83
    for name, stamp in kept.items():  # finished shards were skipped, not rewritten
        p = out / "shards" / name
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, name
    assert cache_digest(out) == cache_digest(reference_cache)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_a_refusal_on_one_rank_is_one_error_line(copy_cache, teacher_dir, corpus_file, dump_args,
                                                 one_line_error) -> None:
    """Another job holds the cache's lock: rank 0 is refused, the job stops, one `Error:` line
    (torchrun adds its report of the failed processes, which is the launcher's, not kdpipe's)."""
    cache = copy_cache()
    (cache / "manifest.json").unlink()
    with exclusive_lock(cache, "cache"):
        proc = torchrun("teacher-dump", "--teacher", teacher_dir, "--data", corpus_file, "--out", cache,
                        *dump_args, check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")]
    assert proc.returncode != 0
    assert len(errors) == 1 and "another kdpipe process is writing cache" in errors[0], proc.stderr[-3000:]
    assert "kdpipe/stages" not in proc.stderr and "/stages/" not in proc.stderr, proc.stderr[-3000:]
    assert not (cache / "manifest.json").exists()


# ----------------------------------------------------------------------------------- train

@pytest.fixture(scope="module")
def nodrop(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("student") / "nodrop.json"
    path.write_text(json.dumps(NO_DROPOUT))
    return path


def test_two_rank_training_matches_one_rank_and_resumes_on_any_world_size(
        tmp_path, reference_cache, nodrop, kdpipe_inproc) -> None:
    """The one-rank runs go through the CLI in this process (a world of one), saving start-ups."""
    args = ("--cache", reference_cache, "--student-config", nodrop, *TRAIN)
    one, two = tmp_path / "one", tmp_path / "two"
    proc = kdpipe_inproc("student-train", *args, "--out", one)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(torchrun("student-train", *args, "--out", two).stdout)
    assert summary["status"] == "trained" and summary["steps"] == 21

    # same global batches, same rows, same trajectory (float tolerance: sums in another order)
    assert (two / "samples.jsonl").read_text() == (one / "samples.jsonl").read_text()
    m1, m2 = lines(one / "metrics.jsonl"), lines(two / "metrics.jsonl")
    assert [m["step"] for m in m2] == list(range(1, 22))
    for a, b in zip(m1, m2):
        for key in ("loss", "loss_ce", "loss_mlm", "loss_cos"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    w1, w2 = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    for name, t in w1.items():
        assert (w2[name] - t).abs().max() < 1e-4, name
    # one writer: only rank 0's files, no temporaries
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == [
        "latest", "step-0000008", "step-0000016", "step-0000021"]  # the last step is checkpointed too
    assert not [p for p in two.rglob("*") if ".tmp" in p.name]

    # resume from the step-16 checkpoint, as after a kill: on two ranks bit-exact, on one the same rows
    for ranks in (2, 1):
        part = tmp_path / f"resumed-{ranks}"
        shutil.copytree(two, part)
        shutil.rmtree(part / "final")
        shutil.rmtree(part / "checkpoints" / "step-0000021")
        (part / "checkpoints" / "latest").write_text("step-0000016\n")
        if ranks == 2:
            out = json.loads(torchrun("student-train", *args, "--out", part).stdout)
        else:
            proc = kdpipe_inproc("student-train", *args, "--out", part)
            assert proc.returncode == 0, proc.stderr
            out = json.loads(proc.stdout)
        assert out["status"] == "resumed" and out["steps"] == 21
        assert (part / "samples.jsonl").read_text() == (two / "samples.jsonl").read_text(), ranks
        resumed = load_file(str(part / "final" / "model.safetensors"))
        if ranks == 2:
            assert [m["loss"] for m in lines(part / "metrics.jsonl")] == [m["loss"] for m in m2]
            assert all((resumed[k] == t).all() for k, t in w2.items())
        else:
            for a, b in zip(m2, lines(part / "metrics.jsonl")):
                assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]


def test_two_rank_training_with_the_layer_loss_matches_one_rank(tmp_path, small_corpus_file, nodrop,
                                                                kdpipe_inproc) -> None:
    """L_layer's and L_rel's shares of each rank are weighted like L_cos's (and L_rel's student
    projections are the DDP module's own): the two-rank trajectory is the one-rank one."""
    from helpers import tiny_teacher

    teacher = tiny_teacher(tmp_path / "bert4", layers=4)
    cache = tmp_path / "cache"
    proc = kdpipe_inproc("teacher-dump", "--teacher", teacher, "--data", small_corpus_file, "--out", cache,
                         "--seq-len", "32", "--shard-size", "4", "--hidden-dim", "8", "--hidden-layers", "2",
                         "--relation-layer", "3", "--temperatures", "1.5", "--writers", "1")
    assert proc.returncode == 0, proc.stderr
    i = TRAIN.index("--epochs")
    args = ("--cache", cache, "--teacher", teacher, "--student-config", nodrop, *TRAIN[:i], *TRAIN[i + 2:],
            "--max-steps", "4", "--alpha-layer-cos", "2", "--alpha-relation", "1")
    one, two = tmp_path / "one", tmp_path / "two"
    proc = kdpipe_inproc("student-train", *args, "--out", one)
    assert proc.returncode == 0, proc.stderr
    torchrun("student-train", *args, "--out", two)
    m1, m2 = lines(one / "metrics.jsonl"), lines(two / "metrics.jsonl")
    assert len(m1) == len(m2) == 4
    for a, b in zip(m1, m2):
        for key in ("loss", "loss_cos", "loss_layer_cos", "loss_relation"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
