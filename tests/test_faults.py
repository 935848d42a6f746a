"""Faults and bad input: nothing is lost and nothing wrong is trained on.

Concurrent writers are refused at once (and a lock left by a killed process blocks nothing), a
damaged cache is refused before training uses it, pathological text is refused or read in bounded
memory, and property tests over the option parsers and the config builder. The random-kill soak
over every stage is `bench/faults.py` (results in bench/RESULTS.md).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdpipe.pipeline.cache import verify_cache

TRAIN = ("--temperature", "1.5", "--batch-size", "8", "--seed", "0")


def wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.005)


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


# ------------------------------------------------------------------------------ (a) concurrency

def test_a_second_dump_on_the_same_cache_is_refused_while_the_first_finishes(
        tmp_path, kdpipe_popen, kdpipe_inproc, one_line_error, teacher_dir, dump_args):
    from helpers import tiny_corpus

    data = tiny_corpus(tmp_path / "corpus.txt", lines=2500, seed=5)  # long enough to overlap
    out = tmp_path / "cache"
    args = ("teacher-dump", "--teacher", teacher_dir, "--data", data, "--out", out, *dump_args)
    first = kdpipe_popen(*args)
    try:
        wait_for(lambda: any((out / "shards").glob("shard-*.parquet")), first, "first shard")
        second = kdpipe_inproc(*args)
        still_running = first.poll() is None
    except BaseException:
        kill(first)
        raise
    assert first.wait(timeout=120) == 0
    if second.returncode == 0:
        assert not still_running
        pytest.skip("the first dump finished before the second one took the lock")
    one_line_error(second, "another kdpipe process is writing cache", str(out / ".lock"))
    # the first one was not disturbed: complete, every listed shard intact, nothing else there
    assert verify_cache(out)[1] == []
    assert len(manifest(out)["shards"]) == len(list((out / "shards").iterdir()))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_a_second_student_train_on_the_same_run_is_refused_while_the_first_finishes(
        tmp_path, reference_cache, kdpipe_popen, kdpipe_inproc, one_line_error):
    out = tmp_path / "run"
    args = ("student-train", "--cache", reference_cache, "--out", out, *TRAIN, "--epochs", "6",
            "--save-every", "10")
    first = kdpipe_popen(*args)
    try:
        wait_for(lambda: (out / "run.json").exists(), first, "run.json")
        second = kdpipe_inproc(*args)
        still_running = first.poll() is None
    except BaseException:
        kill(first)
        raise
    assert first.wait(timeout=120) == 0
    if second.returncode == 0:
        assert not still_running
        pytest.skip("the first run finished before the second one took the lock")
    one_line_error(second, "another kdpipe process is writing run", str(out / ".lock"))
    assert (out / "final" / "model.safetensors").is_file()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "a step was logged twice"


def test_a_lock_left_by_a_killed_run_does_not_block_the_rerun(tmp_path, reference_cache, kdpipe_popen,
                                                              kdpipe_inproc):
    out = tmp_path / "run"
    args = ("student-train", "--cache", reference_cache, "--out", out, *TRAIN, "--epochs", "2",
            "--save-every", "3")
    proc = kdpipe_popen(*args)
    try:
        wait_for(lambda: (out / "checkpoints" / "latest").exists(), proc, "checkpoint")
    finally:
        kill(proc)
    assert (out / ".lock").exists()  # the file stays; the kernel dropped the lock with the process
    rerun = kdpipe_inproc(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["status"] in ("resumed", "already complete")
    assert (out / "final" / "model.safetensors").is_file()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]



def test_a_run_killed_while_writing_its_record_resumes(tmp_path, reference_cache, kdpipe_inproc):
    """Killed between creating run.json's temporary and renaming it: the directory holds only our
    lock and that temporary, and the rerun starts the run instead of refusing a 'foreign' folder."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").touch()
    (out / ".run.json.4242.tmp").write_text('{"half": ')
    rerun = kdpipe_inproc("student-train", "--cache", reference_cache, "--out", out, *TRAIN,
                          "--max-steps", "2")
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "final" / "model.safetensors").is_file()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def refused_then_unblocked_after_kill(args: tuple, out: Path, started, what: str, kdpipe_popen,
                                       kdpipe_inproc, one_line_error) -> subprocess.CompletedProcess:
    """Start `args`; once `started()`, the same command in a second process must be refused naming
    the lock; then SIGKILL the first: its lock must not block the rerun, which must finish."""
    first = kdpipe_popen(*args)
    try:
        wait_for(started, first, "output")
        second = kdpipe_inproc(*args)
        still_running = first.poll() is None
    finally:
        kill(first)
    if second.returncode == 0:
        assert not still_running
        pytest.skip("the first process finished before the second one took the lock")
    one_line_error(second, f"another kdpipe process is writing {what}", str(out / ".lock"))
    assert (out / ".lock").exists()  # left by the killed process; the kernel dropped its lock
    rerun = kdpipe_inproc(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and "tmp" in p.name]
    return rerun


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, teacher_dir) -> Path:
    """The tiny teacher without its masked-LM head, as teacher-adapt takes it."""
    from transformers import BertModel, BertTokenizerFast

    enc = tmp_path_factory.mktemp("encoder")
    BertModel.from_pretrained(teacher_dir).save_pretrained(enc)
    BertTokenizerFast.from_pretrained(teacher_dir).save_pretrained(enc)
    return enc


def test_a_second_teacher_adapt_on_the_same_output_is_refused_and_a_killed_ones_lock_blocks_nothing(
        tmp_path, encoder_dir, corpus_file, kdpipe_popen, kdpipe_inproc, one_line_error):
    """Before OUT itself was locked, a second adapt could delete the first's half-published
    model/ temporary (and both race to publish it)."""
    out = tmp_path / "adapted"
    args = ("teacher-adapt", "--teacher", encoder_dir, "--data", corpus_file, "--out", out,
            "--seq-len", "32", "--max-steps", "8", "--batch-size", "8", "--warmup-steps", "2",
            "--save-every", "4")
    refused_then_unblocked_after_kill(args, out, lambda: (out / "cache").exists(), "teacher-adapt output",
                                      kdpipe_popen, kdpipe_inproc, one_line_error)
    assert (out / "model" / "model.safetensors").is_file()


def test_a_second_eval_on_the_same_report_is_refused_and_a_killed_ones_lock_blocks_nothing(
        tmp_path, teacher_dir, small_corpus_file, finished_run, kdpipe_popen, kdpipe_inproc, one_line_error):
    import random

    from helpers import WORDS

    rnd = random.Random(0)
    task = tmp_path / "task.jsonl"
    with open(task, "w") as f:
        for i in range(40):
            label, cue = ("pos", "great light") if i % 2 else ("neg", "war old")
            words = " ".join(rnd.choice(WORDS) for _ in range(5))
            f.write(json.dumps({"text": f"{words} {cue}", "label": label}) + "\n")
    out = tmp_path / "report"
    args = ("eval", "--teacher", teacher_dir, "--student", finished_run, "--task", task, "--heldout",
            small_corpus_file, "--out", out, "--seeds", "1", "--epochs", "1", "--batch-size", "8",
            "--lr", "1e-3", "--seq-len", "32", "--heldout-sequences", "16", "--speed-repeats", "2",
            "--speed-warmup", "1", "--speed-batch-size", "4", "--speed-seq-len", "16",
            "--max-train-examples", "20")
    refused_then_unblocked_after_kill(args, out, lambda: (out / ".lock").exists(), "report directory",
                                      kdpipe_popen, kdpipe_inproc, one_line_error)
    assert (out / "report.json").is_file()


# ---------------------------------------------------------- (b) damage found before training uses it

SHARD = "shards/shard-00003.parquet"


def _flip(c: Path) -> None:
    p = c / SHARD
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0x01
    p.write_bytes(bytes(b))


def _truncate(c: Path) -> None:
    p = c / SHARD
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _delete(c: Path) -> None:
    (c / SHARD).unlink()


def _edit_manifest(c: Path) -> None:
    m = manifest(c)
    m["shards"][3]["rows"] += 1
    (c / "manifest.json").write_text(json.dumps(m))


def _retype_manifest(c: Path) -> None:
    m = manifest(c)
    m["shards"][3]["rows"] = "many"
    (c / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage, named, verify_says", [
    (_flip, SHARD, "SHA-256"), (_truncate, SHARD, "size"), (_delete, SHARD, "missing"),
    (_edit_manifest, "manifest.json", "manifest.json"),
    (_retype_manifest, "manifest.json is invalid: shards.3.rows", "shards.3.rows"),
], ids=["flipped-byte", "truncated", "deleted", "edited-manifest", "retyped-manifest"])
def test_a_damaged_cache_is_refused_naming_the_file(damage, named, verify_says, copy_cache, tmp_path,
                                                     kdpipe_inproc, one_line_error):
    cache = copy_cache()
    damage(cache)
    out = tmp_path / "run"
    proc = kdpipe_inproc("student-train", "--cache", cache, "--out", out, *TRAIN, "--epochs", "1",
                         "--record-samples")
    one_line_error(proc, named)
    assert not (out / "final").exists()
    if (out / "samples.jsonl").exists() and named == SHARD:  # nothing of the damaged shard was used
        rows = {(s.get("shard"), s.get("row")) for s in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}
        assert not any(r[0] in (3, "shard-00003", SHARD) for r in rows), rows
    verify = kdpipe_inproc("cache", "verify", cache)
    assert verify.returncode != 0
    assert named in verify.stdout + verify.stderr and verify_says in verify.stdout + verify.stderr


def test_an_unlisted_shard_is_reported_by_verify_and_never_read(copy_cache, tmp_path, kdpipe_inproc):
    cache = copy_cache()
    extra = cache / "shards" / "shard-99999.parquet"
    shutil.copy(cache / SHARD, extra)
    verify = kdpipe_inproc("cache", "verify", cache)
    said = verify.stdout + verify.stderr
    assert verify.returncode != 0 and "shards/shard-99999.parquet" in said and "not listed" in said
    extra.write_bytes(b"not parquet at all")  # were it read, training would fail
    proc = kdpipe_inproc("student-train", "--cache", cache, "--out", tmp_path / "run", *TRAIN,
                         "--max-steps", "4")
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------- (c) pathological input, bounded memory

_RSS = ("import resource, subprocess, sys\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr)\n"
        "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(r.returncode)\n")


def run_measured(*args) -> tuple[subprocess.CompletedProcess, int]:
    """`kdpipe ARGS` under a fresh parent, so RUSAGE_CHILDREN is this one command's peak RSS (MB)."""
    kdpipe = shutil.which("kdpipe", path=str(Path(sys.executable).parent)) or "kdpipe"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", _RSS, kdpipe, *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)
    kb = int(proc.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    proc.stderr = proc.stderr.rsplit("PEAK_RSS_KB", 1)[0]
    return proc, kb // 1024


def test_one_enormous_line_is_read_in_bounded_memory(tmp_path, teacher_dir, one_line_error):
    import random

    from helpers import WORDS

    rnd = random.Random(0)
    line = " ".join(rnd.choice(WORDS) for _ in range(1_000_000))  # ~5 MB, one line, no newline
    (tmp_path / "huge.txt").write_text(line)
    proc, rss_mb = run_measured("teacher-dump", "--teacher", teacher_dir, "--data", tmp_path / "huge.txt",
                                "--out", tmp_path / "cache", "--seq-len", "32", "--top-k", "4",
                                "--hidden-dim", "8", "--max-sequences", "16", "--shard-size", "16")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sequences"] == 16
    # before documents were tokenized in pieces this line peaked at 1.2 GB (16 MB: 3.2 GB)
    assert rss_mb < 900, f"peak RSS {rss_mb} MB"


@pytest.mark.parametrize("content, needle", [
    (b" \t\n\n   \n" * 20000, "holds no text"),
    (bytes(range(256)) * 2000, "not valid UTF-8"),
    (b"\x00" * 100_000, "holds no text"),
], ids=["whitespace-only", "binary", "nul-bytes"])
def test_text_that_is_not_text_is_refused_in_one_line(content, needle, tmp_path, teacher_dir, kdpipe_inproc,
                                                       one_line_error):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    proc = kdpipe_inproc("teacher-dump", "--teacher", teacher_dir, "--data", path, "--out",
                         tmp_path / "cache", "--seq-len", "32")
    if proc.returncode == 0:  # NULs are valid UTF-8: then a clear success with what was found
        assert json.loads(proc.stdout)["sequences"] >= 1
        return
    one_line_error(proc, needle)


def test_a_long_document_tokenizes_to_the_same_ids_in_pieces(tokenizer):
    import random

    from helpers import WORDS

    from kdpipe.pipeline import corpus

    rnd = random.Random(2)
    words = WORDS + ["river,", "game.", "\t", "\n"]
    long_text = " ".join(rnd.choice(words) for _ in range(60_000))
    assert len(long_text) > 4 * corpus._LONG_TEXT
    pieces = corpus._pieces(long_text)
    assert "".join(pieces) == long_text and max(map(len, pieces)) <= corpus._LONG_TEXT
    docs = list(corpus.iter_token_docs(["a short one", long_text, "the end"], tokenizer))
    whole = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    assert len(docs) == 3 and docs[1] == whole
    assert docs[0] == tokenizer("a short one", add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ (e) a disk that fills up mid-write

TRAIN_RUN = (*TRAIN, "--max-steps", "9", "--save-every", "3", "--log-every", "1")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, reference_cache, kdpipe_inproc) -> Path:
    """An uninterrupted student run (checkpoints at steps 3 and 6): what a resume must equal."""
    out = tmp_path_factory.mktemp("faults-run") / "run"
    proc = kdpipe_inproc("student-train", "--cache", reference_cache, "--out", out, *TRAIN_RUN)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(bytes)`: a real tmpfs of that size (writes past it fail with ENOSPC) and
    `small_disk.grow()` to free space; skipped where this process may not mount one."""
    mounted: list[Path] = []

    def make(size: int) -> Path:
        where = tmp_path / "disk"
        where.mkdir()
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a small file system needs root")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "kdpipe-test", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(where)
        return where

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=64m", str(mounted[0])], check=True)

    make.grow = grow
    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _on_disk(root: Path) -> int:
    """Bytes `root`'s files take on a tmpfs (whole 4 KiB pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in root.rglob("*") if p.is_file())


def _temporaries(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.startswith(".") and "tmp" in p.name]


def _tensors_equal(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch_equal(x[k], y[k]) for k in x)


def torch_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())


def test_a_disk_that_fills_up_mid_dump_then_frees_space_ends_byte_identical(
        small_disk, reference_cache, kdpipe_inproc, one_line_error, digest, teacher_dir, corpus_file,
        dump_args):
    disk = small_disk(int(_on_disk(reference_cache) * 0.45))
    cache = disk / "cache"
    args = ("teacher-dump", "--teacher", teacher_dir, "--data", corpus_file, "--out", cache, *dump_args)
    one_line_error(kdpipe_inproc(*args), "no space left on device", str(cache / "shards" / "shard-"))
    assert not (cache / "manifest.json").exists()
    shards = sorted((cache / "shards").glob("shard-*.parquet"))
    assert 0 < len(shards) < len(manifest(reference_cache)["shards"])
    ref = digest(reference_cache)
    for p in shards:  # nothing partial under a final name
        assert digest(cache)[f"shards/{p.name}"] == ref[f"shards/{p.name}"], p.name
    assert _temporaries(cache) == []
    small_disk.grow()
    assert kdpipe_inproc(*args).returncode == 0
    got = digest(cache)
    for d in (got, ref):
        d.pop("run_info.json"), d.pop("manifest.json")  # run_info records --out; the manifest, times
    assert got == ref
    strip = lambda m: {k: v for k, v in m.items() if k not in ("created_at", "finished_at")}  # noqa: E731
    assert strip(manifest(cache)) == strip(manifest(reference_cache))


def test_a_disk_that_fills_up_at_a_checkpoint_keeps_the_last_one_and_resumes_exactly(
        small_disk, reference_cache, finished_run, kdpipe_inproc, one_line_error):
    ckpt = finished_run / "checkpoints" / "step-0000003"
    room = _on_disk(finished_run) - _on_disk(finished_run / "final") - _on_disk(finished_run / "checkpoints")
    disk = small_disk(room + int(1.6 * _on_disk(ckpt)))  # one checkpoint fits, the second does not
    out = disk / "run"
    args = ("student-train", "--cache", reference_cache, "--out", out, *TRAIN_RUN)
    one_line_error(kdpipe_inproc(*args), "no space left on device", str(out / "checkpoints" / "step-0000006"))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000003"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000003"]
    assert _temporaries(out) == [] and not (out / "final").exists()
    small_disk.grow()
    rerun = kdpipe_inproc(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["status"] == "resumed"
    assert _tensors_equal(out / "final" / "model.safetensors", finished_run / "final" / "model.safetensors")
    steps = lambda r: [json.loads(x)["step"] for x in (r / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert steps(out) == steps(finished_run) == list(range(1, 10))


def test_a_checkpoint_past_a_file_size_limit_is_one_line_and_leaves_nothing_half_written(
        tmp_path, reference_cache, finished_run, kdpipe_cli, kdpipe_inproc, one_line_error):
    """RLIMIT_FSIZE in a real process (runs without root): write() fails with EFBIG in the middle
    of the checkpoint's optimizer state (torch.save used to say only 'unexpected pos')."""
    opt = (finished_run / "checkpoints" / "step-0000003" / "optimizer.pt").stat().st_size
    biggest_other = max(p.stat().st_size for p in finished_run.rglob("*")
                        if p.is_file() and p.name != "optimizer.pt")
    assert biggest_other < opt
    limit = (biggest_other + opt) // 2

    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    out = tmp_path / "run"
    args = ("student-train", "--cache", reference_cache, "--out", out, *TRAIN_RUN)
    one_line_error(kdpipe_cli(*args, check=False, preexec_fn=preexec), "file too large",
                   str(out / "checkpoints" / "step-0000003"))
    assert not (out / "checkpoints" / "latest").exists() and not (out / "final").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == [] and _temporaries(out) == []
    rerun = kdpipe_inproc(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert _tensors_equal(out / "final" / "model.safetensors", finished_run / "final" / "model.safetensors")


def test_write_errors_are_recognised_whatever_library_raised_them():
    """Exception shapes seen above: safetensors and tokenizers (Rust) give 'os error N' in the
    message, torch.save a RuntimeError over the OSError, shutil.copytree a list of strings."""
    from kdpipe.pipeline.fsutil import write_errno

    assert write_errno(RuntimeError("Error while serializing: I/O error: No space left on device "
                                    "(os error 28)")) == 28
    try:
        try:
            raise OSError(27, "File too large")
        except OSError:
            raise RuntimeError("unexpected pos 704 vs 598")
    except RuntimeError as e:
        assert write_errno(e) == 27
    assert write_errno(ValueError("os error 2")) is None
    assert write_errno(shutil.Error([("a", "b", "[Errno 28] No space left on device")])) == 28


# ------------------------------------------------------------------------ bad input, every command

def _commands():
    """(argv prefix, click command) of every command and subcommand."""
    import importlib

    from kdpipe.pipeline.cli import COMMANDS

    for name, spec in COMMANDS.items():
        module, attr = spec.split(":")
        cmd = getattr(importlib.import_module(module), attr)
        if isinstance(cmd, click.Group):
            yield from (((name, sub), c) for sub, c in cmd.commands.items())
        else:
            yield (name,), cmd


def _wrong_values():
    """A wrong-type value for every typed option of every command, read from the commands
    themselves (so a new option is covered the day it is added)."""
    for path, cmd in _commands():
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.is_flag:
                continue
            if isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType)):
                yield path, p.opts[0], "abc"
            elif isinstance(p.type, click.Choice):
                yield path, p.opts[0], "no-such-choice"
            elif p.callback is not None and p.callback.__qualname__.startswith("_list_option"):
                yield path, p.opts[0], "1,x"


def test_every_typed_option_of_every_command_refuses_a_wrong_value(kdpipe_inproc, one_line_error):
    cases = list(_wrong_values())
    assert len(cases) > 60 and {c[0][0] for c in cases} >= {"teacher-dump", "student-train", "teacher-adapt",
                                                             "eval", "cache"}
    for path, option, value in cases:
        proc = kdpipe_inproc(*path, option, value)
        assert proc.returncode == 2, (path, option)
        one_line_error(proc, option)


def test_a_missing_config_file_is_named_by_every_command_that_takes_one(tmp_path, kdpipe_inproc,
                                                                         one_line_error):
    takers = [path for path, cmd in _commands() if any(p.name == "config_file" for p in cmd.params)]
    assert {"teacher-dump", "student-train", "teacher-adapt", "eval"} <= {p[0] for p in takers}
    for path in takers:
        one_line_error(kdpipe_inproc(*path, "--config", tmp_path / "nope.yaml"), "nope.yaml")
    assert list(tmp_path.iterdir()) == []


def test_missing_inputs_and_seeds_out_of_range_are_named(tmp_path, reference_cache, finished_run, teacher_dir,
                                                         small_corpus_file, kdpipe_inproc, one_line_error):
    """Seeds past 2**32 - 1 were a traceback from torch.manual_seed (student-train, teacher-adapt),
    negative ones from numpy (cache fidelity); teacher-adapt created OUT before finding its
    teacher missing."""
    out = tmp_path / "out"
    none = tmp_path / "missing"
    cases = [
        (("student-train", "--cache", reference_cache, "--out", out, "--seed", str(2**64)), ("seed", "4294967295")),
        (("teacher-adapt", "--teacher", teacher_dir, "--data", small_corpus_file, "--out", out, "--seed",
          str(2**32)), ("seed",)),
        (("teacher-adapt", "--teacher", none, "--data", small_corpus_file, "--out", out), (str(none),)),
        (("teacher-adapt", "--teacher", teacher_dir, "--data", none, "--out", out), (str(none),)),
        (("eval", "--teacher", teacher_dir, "--student", finished_run, "--out", out, "--split-seed",
          str(2**32), "--mask-seed", "-1"), ("split_seed", "mask_seed")),
        (("eval", "--teacher", teacher_dir, "--student", finished_run, "--out", out, "--task", none),
         (str(none),)),
        (("eval", "--teacher", none, "--student", finished_run, "--out", out), (str(none),)),
        (("cache", "fidelity", reference_cache, "--teacher", teacher_dir, "--k", "4", "--samples", "4",
          "--seed", "-5"), ("--seed",)),
        (("cache", "fidelity", reference_cache, "--teacher", none, "--k", "4"), (str(none),)),
        (("cache", "fidelity", none, "--teacher", teacher_dir), (str(none),)),
    ]
    for args, needles in cases:
        one_line_error(kdpipe_inproc(*args), *needles)
        # nothing written (teacher-adapt finds its corpus missing inside, under its lock on OUT)
        assert not out.exists() or [p.name for p in out.rglob("*")] == [".lock"], args
        shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------------------------ (d) property tests

def _parse(parser, value):
    return parser(None, click.Option(["--temperatures"]), value)


items = st.lists(st.tuples(st.floats(allow_nan=False, allow_infinity=False, width=32),
                           st.sampled_from(["", " ", "  ", "\t"])), max_size=8)


@settings(max_examples=200, deadline=None)
@given(items=items, empties=st.lists(st.integers(0, 8), max_size=3))
def test_floats_option_round_trips_any_list(items, empties):
    from kdpipe.pipeline.cli import floats_option

    parts = [f"{pad}{x!r}{pad}" for x, pad in items]
    for i in empties:  # blank items (",,", trailing comma) are skipped
        parts.insert(min(i, len(parts)), " ")
    got = _parse(floats_option, ",".join(parts))
    assert got == [x for x, _ in items]


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(-10**12, 10**12), max_size=8))
def test_ints_option_round_trips_any_list(values):
    from kdpipe.pipeline.cli import ints_option

    assert _parse(ints_option, " , ".join(map(str, values))) == values


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=30))
def test_list_options_fail_only_as_a_bad_parameter(text):
    from kdpipe.pipeline.cli import floats_option, ints_option

    for parser, kind in ((floats_option, float), (ints_option, int)):
        try:
            got = _parse(parser, text)
        except click.BadParameter as e:
            assert repr(text) in str(e.message)
        else:
            assert all(isinstance(x, kind) for x in got)
            assert len(got) == sum(1 for x in text.split(",") if x.strip())


INT_KEYS = ("seq_len", "mask_views", "seed", "top_k", "samples", "pca_sequences", "shard_size",
            "batch_size", "zstd_level")
FLOAT_KEYS = ("mask_prob", "mask_token_prob", "random_token_prob", "mask_smoothing")
wrong = st.one_of(st.text(alphabet="xyzq", min_size=1, max_size=5),
                  st.lists(st.integers(), min_size=1, max_size=2),
                  st.dictionaries(st.text("ab", min_size=1, max_size=2), st.integers(), min_size=1, max_size=2))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=st.dictionaries(st.sampled_from(INT_KEYS + FLOAT_KEYS), wrong, max_size=6),
       unknown=st.sets(st.from_regex(r"[a-z]{3,10}_[a-z]{2,6}", fullmatch=True), max_size=4))
def test_build_config_lists_every_problem(bad, unknown):
    from kdpipe.pipeline.config import build_config
    from kdpipe.pipeline.errors import ConfigError
    from kdpipe.stages.teacher_dump import DumpConfig

    unknown = {k for k in unknown if k not in DumpConfig.model_fields}
    values = {"teacher": "t", "data": ["d"], "out": "o", **bad, **{k: 1 for k in unknown}}
    if not bad and not unknown:
        build_config(DumpConfig, None, values)
        return
    with pytest.raises(ConfigError) as e:
        build_config(DumpConfig, None, values)
    msg = str(e.value)
    n = len(bad) + len(unknown)
    assert msg.startswith(f"invalid configuration ({n} problem{'s' if n > 1 else ''}): "), msg
    assert "\n" not in msg
    for k in bad:
        assert f"{k}: " in msg, (k, msg)
    for k in unknown:
        assert f"{k}: unknown key" in msg, (k, msg)


# ------------------------------------------------------------------------------ bugs the soak found

def test_teacher_adapt_is_reproducible_when_the_head_is_missing(tmp_path, teacher_dir, small_corpus_file,
                                                                 kdpipe_inproc):
    """The missing head's random init was drawn from an unseeded RNG when the student copied the
    teacher: two runs (or a run killed before its first checkpoint, then rerun) trained different
    models."""
    from safetensors.torch import load_file
    from transformers import BertModel, BertTokenizerFast

    enc = tmp_path / "encoder"
    BertModel.from_pretrained(teacher_dir).save_pretrained(enc)
    BertTokenizerFast.from_pretrained(teacher_dir).save_pretrained(enc)
    models = []
    for name in ("a", "b"):
        proc = kdpipe_inproc("teacher-adapt", "--teacher", enc, "--data", small_corpus_file, "--out",
                             tmp_path / name, "--seq-len", "32", "--max-steps", "2", "--batch-size", "4",
                             "--warmup-steps", "1")
        assert proc.returncode == 0, proc.stderr
        models.append(load_file(str(tmp_path / name / "model" / "model.safetensors")))
    a, b = models
    assert a.keys() == b.keys()
    assert [k for k in a if not (a[k] == b[k]).all()] == []
