"""`kdpipe teacher-dump` end to end: the manifest as commit point, refusals that touch nothing,
resumption after `kill -9` ending byte-identical, `cache verify`, and one-line errors for bad
input (nothing on disk damaged)."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import plain_rows
from kdpipe.pipeline.cache import fingerprint_sha256, load_manifest, open_shard, verify_cache
from kdpipe.pipeline.errors import CorruptCacheError, KdpipeError
from kdpipe.schemas.manifest import Manifest

TIMESTAMPS = ("created_at", "finished_at")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def without_timestamps(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in TIMESTAMPS}


def dump(cli, teacher: Path, data: Path, out: Path, *extra: str, args: tuple[str, ...] = ()):
    return cli("teacher-dump", "--teacher", teacher, "--data", data, "--out", out, *args, *extra)


# ----------------------------------------------------------------------------- the manifest

def test_manifest_lists_every_shard_truthfully(reference_cache: Path) -> None:
    m = manifest(reference_cache)
    Manifest.model_validate(m)
    shards = m["shards"]
    size = m["fingerprint"]["storage"]["shard_size"]
    assert len(shards) == -(-m["sequences"] // size) > 20
    on_disk = sorted(p.relative_to(reference_cache).as_posix() for p in (reference_cache / "shards").iterdir())
    assert on_disk == [e["path"] for e in shards], "exactly the listed shards, nothing else"
    for i, e in enumerate(shards):
        path = reference_cache / e["path"]
        assert e["path"] == f"shards/shard-{i:05d}.parquet" and e["index"] == i
        assert e["first_seq"] == i * size
        assert e["bytes"] == path.stat().st_size
        assert e["sha256"] == sha256(path)
        assert e["rows"] == pq.ParquetFile(path).metadata.num_rows == e["num_seqs"]
        assert e["tokens"] == sum(pq.read_table(path, columns=["length"]).column("length").to_pylist())
    assert m["rows"] == sum(e["rows"] for e in shards)
    assert m["tokens"] == sum(e["tokens"] for e in shards) == m["fingerprint"]["sequences"]["tokens"]
    assert m["bytes"] == sum(e["bytes"] for e in shards)
    assert m["bytes_per_token"] == pytest.approx(m["bytes"] / m["tokens"], abs=1e-3)
    assert set(m["bytes_per_token_by_column"]) >= {"topk_ids", "topk_logits", "log_z", "hidden"}
    assert sum(m["bytes_per_token_by_column"].values()) < m["bytes_per_token"]  # footers aside
    for entry in (m["projection"], m["teacher_config"]):
        assert sha256(reference_cache / entry["path"]) == entry["sha256"]
    assert json.loads((reference_cache / "fingerprint.json").read_text()) == m["fingerprint"]
    assert fingerprint_sha256(m["fingerprint"]) == m["fingerprint_sha256"]
    assert m["top_k"] == 8 and m["temperatures"] == [1.0, 1.5, 3.0] and m["hidden_dim"] == 16
    run_info = json.loads((reference_cache / "run_info.json").read_text())
    assert run_info["config"]["top_k"] == 8 and "torch" in run_info["versions"]
    assert not [p for p in reference_cache.rglob("*") if p.name.endswith(".tmp")]


def test_cache_info_and_verify(reference_cache: Path, kdpipe_cli) -> None:
    ok = kdpipe_cli("cache", "verify", reference_cache)
    assert ok.stdout.strip() == f"ok: {reference_cache}"
    info = json.loads(kdpipe_cli("cache", "info", reference_cache).stdout)
    assert info["bytes_per_token"] == manifest(reference_cache)["bytes_per_token"] > 0
    assert info["shards"] == len(manifest(reference_cache)["shards"])


def test_rerun_on_a_complete_cache_changes_nothing(copy_cache, kdpipe_cli, digest, teacher_dir: Path,
                                                   corpus_file: Path, dump_args) -> None:
    cache = copy_cache()
    before = digest(cache)
    proc = dump(kdpipe_cli, teacher_dir, corpus_file, cache, args=dump_args)
    assert json.loads(proc.stdout)["status"] == "already complete"
    assert digest(cache) == before


# ------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("change, key", [
    (("--top-k", "4"), "targets.k: 8 -> 4"),
    (("--seed", "1"), "masking.seed: 0 -> 1"),
    (("--seq-len", "24"), "sequences.seq_len: 32 -> 24"),
    (("--temperatures", "1,2"), "targets.temperatures"),
    (("--mask-prob", "0.2"), "masking.mask_prob"),
    (("--hidden-proj", "random"), "hidden.projection: pca -> random"),
])
def test_other_settings_are_refused_and_nothing_changes(
        change, key, copy_cache, kdpipe_inproc, one_line_error, digest, teacher_dir, corpus_file, dump_args):
    cache = copy_cache()
    (cache / "shards" / ".shard-00003.parquet.4242.tmp").write_bytes(b"partial")  # not ours to clean
    before = digest(cache)
    args = list(dump_args)
    for flag, value in zip(change[::2], change[1::2]):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    proc = dump(kdpipe_inproc, teacher_dir, corpus_file, cache, args=tuple(args))
    one_line_error(proc, "other settings", key)
    assert digest(cache) == before


def test_another_teacher_is_refused(copy_cache, kdpipe_cli, one_line_error, digest, other_teacher_dir,
                                    corpus_file, dump_args) -> None:
    """A real subprocess: same architecture and tokenizer, other weights."""
    cache = copy_cache()
    before = digest(cache)
    proc = kdpipe_cli("teacher-dump", "--teacher", other_teacher_dir, "--data", corpus_file,
                      "--out", cache, *dump_args, check=False)
    one_line_error(proc, "other settings", "teacher.weights_sha256")
    assert "tokenizer" not in proc.stderr.split("teacher.weights_sha256")[1]  # only the real difference
    assert digest(cache) == before


def test_another_corpus_is_refused(copy_cache, kdpipe_inproc, one_line_error, digest, teacher_dir,
                                   small_corpus_file, dump_args) -> None:
    cache = copy_cache()
    before = digest(cache)
    proc = dump(kdpipe_inproc, teacher_dir, small_corpus_file, cache, args=dump_args)
    one_line_error(proc, "other settings", "corpus.files")
    assert digest(cache) == before


def test_a_second_writer_is_refused(tmp_path: Path, kdpipe_inproc, one_line_error, teacher_dir,
                                    small_corpus_file, dump_args) -> None:
    from filelock import FileLock

    out = tmp_path / "cache"
    out.mkdir()
    with FileLock(str(out / ".lock")):
        proc = dump(kdpipe_inproc, teacher_dir, small_corpus_file, out, args=dump_args)
    one_line_error(proc, "another kdpipe process is writing")
    assert not (out / "fingerprint.json").exists()


# ------------------------------------------------------------------------ resumption

def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("writers", ["1", "2"])
def test_kill_9_mid_dump_then_rerun_is_byte_identical(tmp_path: Path, reference_cache: Path, kdpipe_popen,
                                                      kdpipe_cli, teacher_dir, corpus_file, dump_args,
                                                      writers: str) -> None:
    """Also with several writers (threads, and a masking process): the masking process dies with
    the parent, nothing is published half written, and the rerun (with another number of writers)
    ends with the same bytes."""
    out = tmp_path / "cache"
    proc = kdpipe_popen("teacher-dump", "--teacher", teacher_dir, "--data", corpus_file, "--out", out,
                        *dump_args, "--writers", writers)
    deadline = time.monotonic() + 90
    try:
        while not list((out / "shards").glob("shard-*.parquet")):
            assert proc.poll() is None, "the dump ended before any shard appeared"
            assert time.monotonic() < deadline, "no shard appeared in 90 s"
            time.sleep(0.005)
        workers = children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    if writers != "1":
        assert workers, "no masking process"
        deadline = time.monotonic() + 30
        while any(alive(p) for p in workers):
            assert time.monotonic() < deadline, "masking processes outlived the killed dump"
            time.sleep(0.05)
    assert not (out / "manifest.json").exists(), "killed mid-dump: no manifest yet"
    n_total = len(manifest(reference_cache)["shards"])
    n_done = len(list((out / "shards").glob("shard-*.parquet")))
    assert 1 <= n_done < n_total

    rerun = json.loads(kdpipe_cli("teacher-dump", "--teacher", teacher_dir, "--data", corpus_file,
                                  "--out", out, *dump_args, "--writers", "3" if writers == "1" else "1").stdout)
    assert rerun["status"] == "resumed"
    assert without_timestamps(manifest(out)) == without_timestamps(manifest(reference_cache))
    for name in ("fingerprint.json", "projection.safetensors", "teacher_config.json"):
        assert sha256(out / name) == sha256(reference_cache / name), name
    ours = sorted(p.name for p in (out / "shards").iterdir())
    assert ours == sorted(p.name for p in (reference_cache / "shards").iterdir())
    for name in ours:
        assert sha256(out / "shards" / name) == sha256(reference_cache / "shards" / name), name
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert verify_cache(out)[1] == []


def test_resume_redoes_missing_shards_and_clears_temporaries(copy_cache, reference_cache, kdpipe_inproc,
                                                              teacher_dir, corpus_file, dump_args, digest):
    """A cache cut short by hand: last shards gone, a half-written temporary, no manifest."""
    cache = copy_cache()
    shards = sorted((cache / "shards").glob("shard-*.parquet"))
    for p in shards[-4:]:
        p.unlink()
    (cache / "shards" / f".{shards[-4].name}.99999.tmp").write_bytes(b"PAR1 half a shard")
    (cache / "manifest.json").unlink()
    with pytest.raises(KdpipeError, match="unfinished"):
        load_manifest(cache)
    proc = dump(kdpipe_inproc, teacher_dir, corpus_file, cache, args=dump_args)
    assert proc.returncode == 0, proc.stderr
    ref = digest(reference_cache)
    got = digest(cache)
    for d in (ref, got):
        d.pop("run_info.json")  # records the --out path
    assert without_timestamps(manifest(cache)) == without_timestamps(manifest(reference_cache))
    got.pop("manifest.json"), ref.pop("manifest.json")
    assert got == ref


def test_views_packing_and_projection_options(tmp_path: Path, kdpipe_inproc, teacher_dir, small_corpus_file):
    out = tmp_path / "cache"
    proc = dump(kdpipe_inproc, teacher_dir, small_corpus_file, out, "--seq-len", "16", "--packing", "line",
                "--mask-views", "2", "--hidden-proj", "random", "--hidden-dim", "8", "--top-k", "5",
                "--shard-size", "7", "--mask-smoothing", "0.7")
    assert proc.returncode == 0, proc.stderr
    m = manifest(out)
    assert m["rows"] == 2 * m["sequences"] and m["hidden_dim"] == 8
    t = pq.read_table(out / m["shards"][0]["path"]).to_pylist()
    assert [(r["seq_id"], r["view"]) for r in t[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    a, b = t[0], t[1]
    assert a["mlm_positions"] != b["mlm_positions"] or a["input_ids"] != b["input_ids"]
    assert all(r["length"] <= 16 for r in t)
    assert verify_cache(out)[1] == []


def test_dry_run_writes_nothing(tmp_path: Path, kdpipe_inproc, teacher_dir, small_corpus_file) -> None:
    out = tmp_path / "cache"
    proc = dump(kdpipe_inproc, teacher_dir, small_corpus_file, out, "--dry-run", "--seq-len", "32")
    assert proc.returncode == 0, proc.stderr
    est = json.loads(proc.stdout)["dry_run"]
    assert est["bytes_per_token"] > 0 and est["tokens_per_s"] > 0
    assert not out.exists()
    # the estimate is made with the shards' own encoding, so it lands near what the dump writes
    real = dump(kdpipe_inproc, teacher_dir, small_corpus_file, out, "--seq-len", "32")
    assert real.returncode == 0, real.stderr
    actual = json.loads(real.stdout)["bytes_per_token"]
    assert abs(est["bytes_per_token"] - actual) / actual < 0.05, (est, actual)


# ----------------------------------------------------------------------------- cache verify

def damage(cache: Path, how: str) -> str:
    shards = sorted((cache / "shards").glob("shard-*.parquet"))
    if how == "flipped":
        p = shards[3]
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
    elif how == "truncated":
        p = shards[5]
        p.write_bytes(p.read_bytes()[:-100])
    elif how == "deleted":
        p = shards[7]
        p.unlink()
    else:  # extra
        p = cache / "shards" / "shard-99999.parquet"
        shutil.copy(shards[0], p)
    return p.relative_to(cache).as_posix()


@pytest.mark.parametrize("how, what", [("flipped", "SHA-256"), ("truncated", "size"),
                                       ("deleted", "missing"), ("extra", "not listed")])
def test_verify_names_the_damaged_file(copy_cache, how: str, what: str) -> None:
    cache = copy_cache()
    name = damage(cache, how)
    _, problems = verify_cache(cache)
    assert len(problems) == 1 and problems[0].path == name and what in problems[0].what
    if how in ("flipped", "truncated", "deleted"):  # a reader refuses the shard before using it
        m = load_manifest(cache)
        entry = next(e for e in m.shards if e.path == name)
        with pytest.raises(CorruptCacheError, match=name):
            open_shard(cache, entry)


def test_verify_cli_reports_every_problem(copy_cache, kdpipe_cli, one_line_error) -> None:
    cache = copy_cache()
    names = [damage(cache, how) for how in ("flipped", "truncated", "deleted", "extra")]
    proc = kdpipe_cli("cache", "verify", cache, check=False)
    one_line_error(proc, "4 problem(s)")
    corrupt = [ln for ln in proc.stderr.splitlines() if ln.startswith("CORRUPT ")]
    assert len(corrupt) == 4
    for name in names:
        assert any(ln.startswith(f"CORRUPT {name}: ") for ln in corrupt), name


def edit_manifest(cache: Path, edit) -> None:
    m = manifest(cache)
    edit(m)
    (cache / "manifest.json").write_text(json.dumps(m, indent=2))


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["fingerprint"]["targets"].update(k=16), "fingerprint does not match"),
    (lambda m: m.update(top_k=16), "top_k"),
    (lambda m: m.update(temperatures=[1.0, 2.0, 4.0]), "temperatures"),
    (lambda m: m.update(tokens=m["tokens"] + 1), "tokens"),
    (lambda m: m["shards"][2].update(rows=99), "rows"),
    (lambda m: m.update(shards=m["shards"][:-1]), "shards"),
    (lambda m: m["shards"][0].update(path="../../../etc/passwd"), "escapes the cache directory"),
    (lambda m: m.update(surprise=1), "surprise"),
    (lambda m: m.update(format_version=2), "format version 2"),
])
def test_an_edited_manifest_is_refused(copy_cache, edit, needle: str) -> None:
    cache = copy_cache()
    edit_manifest(cache, edit)
    with pytest.raises(KdpipeError, match=needle):
        load_manifest(cache)


def test_an_edited_shard_hash_is_reported(copy_cache, kdpipe_inproc, one_line_error) -> None:
    cache = copy_cache()
    edit_manifest(cache, lambda m: m["shards"][1].update(sha256="0" * 64))
    proc = kdpipe_inproc("cache", "verify", cache)
    one_line_error(proc, "1 problem(s)")
    assert "CORRUPT shards/shard-00001.parquet: SHA-256" in proc.stderr


def test_a_broken_manifest_is_one_line(copy_cache, kdpipe_inproc, one_line_error) -> None:
    cache = copy_cache()
    (cache / "manifest.json").write_text('{"format": "kdpipe-cache", ')
    one_line_error(kdpipe_inproc("cache", "info", cache), "not valid JSON")


# ---------------------------------------------------------------------------- bad input

def latin1(tmp: Path) -> Path:
    p = tmp / "latin1.txt"
    p.write_bytes("the caf\u00e9 was na\u00efve .\n".encode("latin-1"))
    return p


def binary(tmp: Path) -> Path:
    p = tmp / "blob.txt"
    p.write_bytes(bytes(range(256)) * 16)
    return p


def text(tmp: Path, content: str, name: str = "c.txt") -> Path:
    p = tmp / name
    p.write_text(content, encoding="utf-8")
    return p


CORPORA = {
    "missing": (lambda tmp: tmp / "nope.txt", "corpus file(s) not found"),
    "empty": (lambda tmp: text(tmp, ""), "corpus is empty"),
    "whitespace": (lambda tmp: text(tmp, "  \n\n\t \n   \n"), "holds no text"),
    "latin1": (latin1, "not valid UTF-8"),
    "binary": (binary, "not valid UTF-8"),
}


@pytest.mark.parametrize("kind", list(CORPORA))
def test_unusable_corpus(tmp_path: Path, kind: str, kdpipe_inproc, one_line_error, teacher_dir) -> None:
    make, needle = CORPORA[kind]
    out = tmp_path / "cache"
    one_line_error(dump(kdpipe_inproc, teacher_dir, make(tmp_path), out, "--seq-len", "32"), needle)
    assert not out.exists()


def test_missing_corpus_in_a_real_process(tmp_path: Path, kdpipe_cli, one_line_error, teacher_dir) -> None:
    proc = kdpipe_cli("teacher-dump", "--teacher", teacher_dir, "--data", tmp_path / "nope.txt",
                      "--out", tmp_path / "cache", check=False)
    one_line_error(proc, "nope.txt")
    assert proc.stdout == "" and not (tmp_path / "cache").exists()


def encoder_only(tmp: Path, teacher_dir: Path) -> Path:
    from transformers import BertConfig, BertModel

    folder = tmp / "encoder"
    BertModel(BertConfig.from_pretrained(teacher_dir)).save_pretrained(folder)
    for f in teacher_dir.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special")):
            shutil.copy(f, folder / f.name)
    return folder


def no_config(tmp: Path, teacher_dir: Path) -> Path:
    folder = Path(shutil.copytree(teacher_dir, tmp / "no-config"))
    (folder / "config.json").unlink()
    return folder


@pytest.mark.parametrize("make, needle", [
    (encoder_only, "no trained masked-LM head"),
    (no_config, "no config.json"),
    (lambda tmp, _: tmp / "no-such-teacher", "no-such-teacher"),
])
def test_unusable_teacher(tmp_path: Path, make, needle, kdpipe_inproc, one_line_error, teacher_dir,
                          small_corpus_file) -> None:
    out = tmp_path / "cache"
    proc = dump(kdpipe_inproc, make(tmp_path, teacher_dir), small_corpus_file, out)
    one_line_error(proc, needle)
    assert not out.exists()


@pytest.mark.parametrize("writers", ["0", "-2", "100000", "two"])
def test_bad_writer_counts_are_one_line(tmp_path: Path, writers: str, kdpipe_inproc, one_line_error,
                                        teacher_dir, small_corpus_file) -> None:
    out = tmp_path / "cache"
    one_line_error(dump(kdpipe_inproc, teacher_dir, small_corpus_file, out, "--writers", writers), "writers")
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (("--top-k", "5000"), "larger than the vocabulary"),
    (("--seq-len", "512"), "over the teacher's limit of 128"),
    (("--hidden-proj", "identity", "--hidden-dim", "8"), "identity keeps the teacher width"),
    (("--hidden-dim", "64"), "between 1 and the teacher width 32"),
])
def test_settings_the_teacher_cannot_honour(tmp_path: Path, args, needle, kdpipe_inproc, one_line_error,
                                             teacher_dir, small_corpus_file) -> None:
    out = tmp_path / "cache"
    one_line_error(dump(kdpipe_inproc, teacher_dir, small_corpus_file, out, *args), needle)
    assert not out.exists()


def test_output_path_is_a_file(tmp_path: Path, kdpipe_inproc, one_line_error, teacher_dir,
                               small_corpus_file) -> None:
    out = tmp_path / "cache"
    out.write_text("precious\n")
    one_line_error(dump(kdpipe_inproc, teacher_dir, small_corpus_file, out), "not a directory")
    assert out.read_text() == "precious\n"


def test_output_dir_with_unrelated_files(tmp_path: Path, kdpipe_inproc, one_line_error, digest,
                                         teacher_dir, small_corpus_file) -> None:
    out = tmp_path / "project"
    (out / "shards").mkdir(parents=True)
    (out / "notes.txt").write_text("mine\n")
    (out / ".draft.tmp").write_text("an editor's temporary, also mine\n")
    (out / "shards" / ".x.tmp").write_text("mine too\n")
    before = digest(out)
    proc = dump(kdpipe_inproc, teacher_dir, small_corpus_file, out, "--seq-len", "32")
    one_line_error(proc, "not empty and holds no kdpipe cache")
    assert digest(out) == before, "a refused run must leave a foreign folder as it was"


@pytest.mark.parametrize("writers", ["1", "2"])
def test_disk_full_mid_dump_leaves_the_cache_intact(copy_cache, kdpipe_cli, one_line_error, digest,
                                                    teacher_dir, corpus_file, dump_args, writers: str) -> None:
    """A real writer hitting a file-size limit (RLIMIT_FSIZE: write() fails with EFBIG, as it
    fails with ENOSPC on a full disk) while resuming: a one-line error naming the file, the
    finished shards untouched, no temporary left; the cache then resumes normally. The same
    with several writer threads."""
    cache = copy_cache()
    for p in sorted((cache / "shards").glob("shard-*.parquet"))[-5:]:
        p.unlink()
    (cache / "manifest.json").unlink()
    before = digest(cache)
    smallest = min(p.stat().st_size for p in (cache / "shards").glob("shard-*.parquet"))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (smallest // 2, resource.RLIM_INFINITY))

    proc = kdpipe_cli("teacher-dump", "--teacher", teacher_dir, "--data", corpus_file, "--out", cache,
                      *dump_args, "--writers", writers, check=False, preexec_fn=limit)
    one_line_error(proc, "file too large", "shards/shard-")
    after = digest(cache)
    before.pop("run_info.json"), after.pop("run_info.json")  # rewritten (it records --out)
    assert after == before
    assert not (cache / "manifest.json").exists()
    kdpipe_cli("teacher-dump", "--teacher", teacher_dir, "--data", corpus_file, "--out", cache, *dump_args)
    assert verify_cache(cache)[1] == []


# ------------------------------------------------------------------------------ target modes

def dump_small(cli, teacher: Path, data: Path, out: Path, *extra: str) -> dict:
    proc = dump(cli, teacher, data, out, "--seq-len", "16", "--shard-size", "5", "--top-k", "4", *extra)
    assert proc.returncode == 0, proc.stderr
    return manifest(out)


def rows_of(cache: Path) -> list[dict]:
    return [r for e in manifest(cache)["shards"] for r in plain_rows(pq.read_table(cache / e["path"]))]


def teacher_logits(model, input_ids: list[int]):
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([input_ids])).logits[0].double()  # (T, V)


def test_topk_at_masked_positions_only(tmp_path: Path, kdpipe_inproc, teacher_dir, teacher_model,
                                       small_corpus_file) -> None:
    import torch

    out = tmp_path / "cache"
    m = dump_small(kdpipe_inproc, teacher_dir, small_corpus_file, out, "--target-positions", "masked",
                   "--temperatures", "1,1.5,3")
    assert m["fingerprint"]["targets"]["positions"] == "masked"
    for row in rows_of(out)[:6]:
        pos = row["mlm_positions"]
        assert len(row["topk_ids"]) == len(row["log_z"]) == len(pos) > 0
        assert len(row["hidden"]) == row["length"]  # hidden states stay per token
        z = teacher_logits(teacher_model, row["input_ids"])[pos]  # (M, V)
        vals = torch.tensor(row["topk_logits"], dtype=torch.float64)
        assert torch.allclose(z.gather(1, torch.tensor(row["topk_ids"].astype(np.int64))), vals, rtol=1e-3, atol=1e-3)
        ref = torch.stack([torch.logsumexp(z / t, dim=-1) for t in (1.0, 1.5, 3.0)], dim=-1)
        assert torch.allclose(torch.tensor(row["log_z"], dtype=torch.float64), ref, atol=1e-4)


def test_exact_mode_stores_what_recomputes_the_logits(tmp_path: Path, kdpipe_inproc, teacher_dir,
                                                      teacher_model, small_corpus_file) -> None:
    """Decoder input per position + the frozen decoder (plain safetensors) give the teacher's logits."""
    import torch
    from safetensors.numpy import load_file

    out = tmp_path / "cache"
    m = dump_small(kdpipe_inproc, teacher_dir, small_corpus_file, out, "--targets", "exact")
    head = load_file(str(out / "head.safetensors"))
    weight, bias = torch.from_numpy(head["weight"]).double(), torch.from_numpy(head["bias"]).double()
    assert weight.shape == (teacher_model.config.vocab_size, teacher_model.config.hidden_size)
    assert m["hidden_dim"] == teacher_model.config.hidden_size
    for row in rows_of(out)[:6]:
        state = torch.tensor(row["teacher_state"], dtype=torch.float64)  # (T, H') fp16 on disk
        z = teacher_logits(teacher_model, row["input_ids"])
        assert (state @ weight.T + bias - z).abs().max().item() < 5e-3 * max(1.0, z.abs().max().item())
    assert verify_cache(out)[1] == []


def test_sampled_mode(tmp_path: Path, kdpipe_inproc, teacher_dir, teacher_model, small_corpus_file) -> None:
    """N draws per position from softmax(z / T): counts add up to N, ids distinct and ascending,
    the frequencies follow the teacher, and the draws are a pure function of the settings."""
    import torch

    out = tmp_path / "cache"
    m = dump_small(kdpipe_inproc, teacher_dir, small_corpus_file, out, "--targets", "sampled",
                   "--samples", "64", "--temperatures", "2")
    assert m["fingerprint"]["targets"]["samples"] == 64
    diffs, variances = [], []
    for row in rows_of(out):
        assert len(row["sample_ids"]) == len(row["sample_counts"]) == row["length"]
        z = teacher_logits(teacher_model, row["input_ids"])  # (T, V)
        p = torch.softmax(z / 2, dim=-1)
        for t, (ids, counts) in enumerate(zip(row["sample_ids"], row["sample_counts"])):
            assert sum(counts) == 64 and ids == sorted(set(ids)) and min(counts) > 0
            # unbiased: sum_u (c_u / N) f(u) estimates E_p[f]; f = the teacher's logit
            estimate = sum(c / 64 * z[t, u].item() for u, c in zip(ids, counts))
            mean = (p[t] * z[t]).sum().item()
            diffs.append(estimate - mean)
            variances.append(((p[t] * z[t] ** 2).sum().item() - mean ** 2) / 64)
    n = len(diffs)
    standard_error = (sum(variances) / n / n) ** 0.5
    assert n > 100 and abs(sum(diffs) / n) < 4 * standard_error
    again = tmp_path / "again"
    dump_small(kdpipe_inproc, teacher_dir, small_corpus_file, again, "--targets", "sampled",
               "--samples", "64", "--temperatures", "2")
    for e in m["shards"]:
        assert sha256(out / e["path"]) == sha256(again / e["path"])


def test_mode_none_needs_no_weights(tmp_path: Path, kdpipe_inproc, teacher_dir, small_corpus_file) -> None:
    """Masked inputs and labels only: a teacher folder without its weights file is enough."""
    folder = Path(shutil.copytree(teacher_dir, tmp_path / "config-only"))
    (folder / "model.safetensors").unlink()
    out = tmp_path / "cache"
    dump_small(kdpipe_inproc, folder, small_corpus_file, out, "--targets", "none")
    names = pq.read_schema(out / manifest(out)["shards"][0]["path"]).names
    assert names == ["seq_id", "view", "length", "input_ids", "mlm_positions", "mlm_labels"]
    assert verify_cache(out)[1] == []


@pytest.mark.parametrize("extra", [("--target-positions", "masked"),
                                   ("--targets", "sampled", "--samples", "16", "--temperatures", "2")])
def test_resume_is_byte_identical_in_other_modes(tmp_path: Path, kdpipe_inproc, digest, teacher_dir,
                                                 small_corpus_file, extra) -> None:
    out = tmp_path / "cache"
    m = dump_small(kdpipe_inproc, teacher_dir, small_corpus_file, out, *extra)
    before = digest(out)
    for e in m["shards"][1::2]:
        (out / e["path"]).unlink()
    (out / "manifest.json").unlink()
    assert without_timestamps(dump_small(kdpipe_inproc, teacher_dir, small_corpus_file, out, *extra)) \
        == without_timestamps(m)
    after = digest(out)
    for d in (before, after):
        d.pop("manifest.json"), d.pop("run_info.json")
    assert after == before
