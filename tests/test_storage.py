"""Caches and run directories at URLs, against a real S3-compatible server (moto) on 127.0.0.1.

A dump to s3:// killed while it uploads leaves no manifest; resumed on "another machine" (another
$KDPIPE_HOME, no staging folder) it reuses the shards already on the store and ends equal to a
local dump. Training from an s3:// cache into an s3:// run ends with the same weights as from the
local cache, and resumes from the latest checkpoint whose meta object exists. file:// URLs are
plain paths; bad URLs and missing buckets are one-line errors.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

BUCKET = "kdpipe-test"
TRAIN = ("--temperature", "1.5", "--batch-size", "8", "--seed", "0", "--max-steps", "12",
         "--save-every", "3", "--log-every", "2")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free loopback port, its endpoint and credentials in the environment
    (which subprocesses inherit), one bucket; stopped and the environment restored after."""
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    aws = tmp_path_factory.mktemp("aws")
    env = {"AWS_ACCESS_KEY_ID": "kdpipe-test", "AWS_SECRET_ACCESS_KEY": "kdpipe-test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
           "AWS_CONFIG_FILE": str(aws / "config"), "AWS_SHARED_CREDENTIALS_FILE": str(aws / "credentials")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    try:
        yield fs
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """This test's $KDPIPE_HOME (staging and mirror folders): a fresh one is another machine."""
    monkeypatch.setenv("KDPIPE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def s3_cache(s3, reference_cache) -> str:
    """The session's reference cache copied onto the store as plain objects."""
    url = f"s3://{BUCKET}/reference"
    s3.put(str(reference_cache) + "/", f"{BUCKET}/reference", recursive=True)
    s3.invalidate_cache()
    return url


def objects(fs, prefix: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    n = len(prefix) + 1
    return {k[n:]: fs.cat_file(k) for k in fs.find(prefix)}


def without_times(manifest: bytes) -> dict:
    m = json.loads(manifest)
    return {k: v for k, v in m.items() if k not in ("created_at", "finished_at")}


def test_dump_killed_while_uploading_leaves_no_manifest_and_resumes_elsewhere(
        s3, tmp_path, monkeypatch, reference_cache, teacher_dir, corpus_file, dump_args, kdpipe_popen,
        kdpipe_inproc, one_line_error):
    url, prefix = f"s3://{BUCKET}/killed", f"{BUCKET}/killed"
    monkeypatch.setenv("KDPIPE_HOME", str(tmp_path / "machine-a"))
    args = ("teacher-dump", "--teacher", teacher_dir, "--data", corpus_file, "--out", url, *dump_args)
    proc = kdpipe_popen(*args)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        s3.invalidate_cache()
        if s3.exists(f"{prefix}/shards/shard-00000.parquet"):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    on_store = objects(s3, prefix)
    assert "manifest.json" not in on_store, "the dump finished before it could be killed"
    assert "fingerprint.json" in on_store and any(k.startswith("shards/") for k in on_store)
    one_line_error(kdpipe_inproc("cache", "verify", url), "not a finished kdpipe cache", "unfinished")

    # another machine: nothing staged locally; the finished shards come from the store
    monkeypatch.setenv("KDPIPE_HOME", str(tmp_path / "machine-b"))
    r = kdpipe_inproc(*args)
    assert r.returncode == 0, r.stderr
    done = json.loads(r.stdout)
    assert done["status"] == "resumed" and done["cache"] == url and done["reused_from_store"] >= 1
    on_store = objects(s3, prefix)
    local = {p.relative_to(reference_cache).as_posix(): p.read_bytes()
             for p in reference_cache.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert set(on_store) == set(local)
    for rel in sorted(set(local) - {"manifest.json", "run_info.json"}):
        assert on_store[rel] == local[rel], rel
    assert without_times(on_store["manifest.json"]) == without_times(local["manifest.json"])
    assert not any((tmp_path / "machine-b" / "staging").iterdir())  # published, then removed

    again = json.loads(kdpipe_inproc(*args).stdout)
    assert again["status"] == "already complete" and objects(s3, prefix) == on_store


def test_manifest_is_not_published_while_a_file_is_missing_from_the_store(s3, tmp_path, reference_cache):
    from kdpipe.pipeline.errors import KdpipeError
    from kdpipe.pipeline.storage import Publisher, Store
    from kdpipe.schemas.manifest import MANIFEST_NAME

    staging = Path(shutil.copytree(reference_cache, tmp_path / "staging"))
    store = Store(f"s3://{BUCKET}/unpublished", "cache")
    shard = "shards/shard-00003.parquet"
    st = (staging / shard).stat()
    # an upload that was believed done but never landed: finish checks the store itself
    pub = Publisher(staging, store, MANIFEST_NAME, sent={shard: (st.st_size, st.st_mtime_ns)})
    with pytest.raises(KdpipeError, match="did not reach the store"):
        pub.finish()
    on_store = store.files()
    assert MANIFEST_NAME not in on_store and shard not in on_store and len(on_store) > 10
    assert Publisher(staging, store, MANIFEST_NAME, sent={}).finish()
    assert store.files()[MANIFEST_NAME] == (staging / MANIFEST_NAME).stat().st_size


def test_train_from_s3_cache_into_s3_run_matches_local_and_resumes(
        s3, s3_cache, tmp_path, monkeypatch, reference_cache, kdpipe_inproc):
    local = tmp_path / "local-run"
    r = kdpipe_inproc("student-train", "--cache", reference_cache, "--out", local, *TRAIN)
    assert r.returncode == 0, r.stderr
    url, prefix = f"s3://{BUCKET}/run", f"{BUCKET}/run"
    monkeypatch.setenv("KDPIPE_HOME", str(tmp_path / "machine-a"))
    monkeypatch.setenv("KDPIPE_SHARD_CACHE_MB", "0.05")  # a few shards on local disk at a time
    r = kdpipe_inproc("student-train", "--cache", s3_cache, "--out", url, *TRAIN)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["status"] == "trained" and summary["final"] == f"{url}/final"
    on_store = objects(s3, prefix)
    record = json.loads(on_store["run.json"])
    assert record["cache"] == s3_cache
    for f in ("model.safetensors", "kdpipe_hidden_map.safetensors"):
        assert on_store[f"final/{f}"] == (local / "final" / f).read_bytes(), f
    steps = sorted({k.split("/")[1] for k in on_store if k.startswith("checkpoints/step-")})
    assert steps == ["step-0000006", "step-0000009", "step-0000012"]  # the last step is checkpointed too

    # killed after step 9's tensors were uploaded but before its meta object: it does not count,
    # and a run on another machine resumes from step 6, ending with the same weights
    gone = [k for k in on_store if k.startswith(("final/", "checkpoints/step-0000012/"))]
    for k in gone + ["checkpoints/step-0000009/checkpoint.json"]:
        s3.rm_file(f"{prefix}/{k}")
    monkeypatch.setenv("KDPIPE_HOME", str(tmp_path / "machine-b"))
    r = kdpipe_inproc("student-train", "--cache", s3_cache, "--out", url, *TRAIN)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "resumed"
    resumed = objects(s3, prefix)
    for f in ("model.safetensors", "kdpipe_hidden_map.safetensors"):
        assert resumed[f"final/{f}"] == (local / "final" / f).read_bytes(), f
    strip = lambda b: [{k: v for k, v in json.loads(x).items() if "per_s" not in k and "wait" not in k}  # noqa: E731
                       for x in b.decode().splitlines()]
    assert strip(resumed["metrics.jsonl"]) == strip((local / "metrics.jsonl").read_bytes())
    assert "checkpoints/step-0000009/checkpoint.json" in resumed

    r = kdpipe_inproc("student-train", "--cache", s3_cache, "--out", url, *TRAIN)
    assert json.loads(r.stdout)["status"] == "already complete"
    assert not any((tmp_path / "machine-b" / "mirror").iterdir()), "mirror folders are removed"


def test_cache_verify_and_info_read_a_store_a_shard_at_a_time(s3, s3_cache, home, monkeypatch,
                                                               reference_cache, kdpipe_inproc, one_line_error):
    from kdpipe.pipeline.storage import RemoteShards, Store

    monkeypatch.setenv("KDPIPE_SHARD_CACHE_MB", "0.02")
    r = kdpipe_inproc("cache", "verify", s3_cache)
    assert r.returncode == 0 and r.stdout.strip() == f"ok: {s3_cache}", r.stderr
    info = json.loads(kdpipe_inproc("cache", "info", s3_cache).stdout)
    assert info["cache"] == s3_cache and info["shards"] == len(list((reference_cache / "shards").iterdir()))

    # the local copies stay within the budget: the oldest fetched shard goes first
    store = Store(s3_cache, "cache")
    sizes = store.files()
    shards = sorted(r for r in sizes if r.startswith("shards/"))
    budget = sum(sizes[r] for r in shards[:3])
    fetcher = RemoteShards(store, home / "m", sizes, budget)
    for rel in shards[:8]:
        fetcher.fetch(rel)
        on_disk = sorted((home / "m" / "shards").iterdir())
        assert sum(p.stat().st_size for p in on_disk) <= budget and (home / "m" / rel).is_file()
    kept = [p.name for p in on_disk]  # the most recently fetched ones, as many as fit
    assert len(kept) >= 2 and kept == [Path(r).name for r in shards[8 - len(kept):8]]

    # a damaged object is caught by the manifest's hash, named, as for a local cache
    key = f"{BUCKET}/reference/{shards[2]}"
    s3.pipe_file(key, (reference_cache / shards[1]).read_bytes())
    try:
        r = kdpipe_inproc("cache", "verify", s3_cache)
        assert r.returncode != 0 and f"CORRUPT {shards[2]}: " in r.stderr
    finally:
        s3.pipe_file(key, (reference_cache / shards[2]).read_bytes())


def test_file_urls_are_local_paths(tmp_path, home, reference_cache, kdpipe_inproc):
    cache = f"file://{reference_cache}"
    r = kdpipe_inproc("cache", "verify", cache)
    assert r.returncode == 0, r.stderr
    r = kdpipe_inproc("student-train", "--cache", cache, "--out", f"file://{tmp_path}/run", *TRAIN[:6],
                      "--max-steps", "2")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["cache"] == str(reference_cache.resolve())


def test_bad_urls_and_missing_buckets_are_one_line_errors(s3, home, teacher_dir, corpus_file, s3_cache,
                                                         kdpipe_inproc, one_line_error):
    one_line_error(kdpipe_inproc("cache", "info", "s3://no-such-bucket/cache"),
                   "bucket 'no-such-bucket' does not exist")
    one_line_error(kdpipe_inproc("teacher-dump", "--teacher", teacher_dir, "--data", corpus_file,
                                 "--out", "nosuchscheme://x/cache"), "unknown URL scheme 'nosuchscheme'")
    one_line_error(kdpipe_inproc("student-train", "--cache", f"s3://{BUCKET}/nothing-here", "--out", "run"),
                   f"cache s3://{BUCKET}/nothing-here does not exist")
    one_line_error(kdpipe_inproc("student-train", "--cache", s3_cache, "--out", "s3://no-such-bucket/run"),
                   "bucket 'no-such-bucket' does not exist")
    s3.pipe_file(f"{BUCKET}/foreign/notes.txt", b"not a cache")
    one_line_error(kdpipe_inproc("teacher-dump", "--teacher", teacher_dir, "--data", corpus_file,
                                 "--out", f"s3://{BUCKET}/foreign"), "holds no kdpipe cache")
    one_line_error(kdpipe_inproc("student-train", "--cache", s3_cache, "--out", f"s3://{BUCKET}/foreign"),
                   "holds no kdpipe student run")
    assert objects(s3, f"{BUCKET}/foreign") == {"notes.txt": b"not a cache"}
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        one_line_error(kdpipe_inproc("cache", "info", "gs://bucket/cache"), "needs gcsfs")


def test_eval_report_on_s3_resumes_from_the_store(s3, tmp_path, monkeypatch, teacher_dir, small_corpus_file,
                                                  kdpipe_inproc):
    from helpers import tiny_teacher

    student = tiny_teacher(tmp_path / "student", layers=1, seed=2)
    url, prefix = f"s3://{BUCKET}/report", f"{BUCKET}/report"
    args = ("eval", "--teacher", teacher_dir, "--student", f"small={student}", "--heldout", small_corpus_file,
            "--no-speed", "--seq-len", "32", "--heldout-sequences", "8", "--out", url)
    monkeypatch.setenv("KDPIPE_HOME", str(tmp_path / "machine-a"))
    r = kdpipe_inproc(*args)
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert first["report"] == f"{url}/report.md" and first["computed"] == 2
    on_store = objects(s3, prefix)
    assert {"eval.json", "report.json", "report.md", "parts/mlm/teacher.json", "parts/mlm/small.json"} <= set(on_store)

    monkeypatch.setenv("KDPIPE_HOME", str(tmp_path / "machine-b"))  # the finished parts come from the store
    r = kdpipe_inproc(*args)
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)
    assert again["computed"] == 0 and again["reused"] == 2 and again["resumed"]
    after = objects(s3, prefix)
    assert {k: v for k, v in after.items() if k.startswith("parts/")} == \
        {k: v for k, v in on_store.items() if k.startswith("parts/")}


@pytest.mark.parametrize("raised, expected", [
    (PermissionError("access denied\nrequest id 42"), "s3://bucket/cache: PermissionError: access denied"),
    (ValueError("bad bucket name\ndetails"), "s3://bucket/cache: bad bucket name"),
])
def test_a_store_library_error_becomes_one_line_naming_the_url(raised, expected):
    """Whatever the filesystem library raises (network, credentials, a bad name) reaches the user as
    one line naming the URL, its first line only."""
    from kdpipe.pipeline.errors import KdpipeError
    from kdpipe.pipeline.storage import store_errors

    with pytest.raises(KdpipeError) as e:
        with store_errors("s3://bucket/cache"):
            raise raised
    assert str(e.value) == expected
