"""Store keys are text a store hands us: every mirror and pull joins them onto a local folder
through one safe join, so a key holding `..`, an absolute path or a symlinked folder never lands
outside it. Shown with fsspec's in-memory filesystem, which stores any key it is given."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from kdpipe.pipeline.errors import KdpipeError
from kdpipe.pipeline.storage import Store, prepare_report, prepare_run

BAD_KEYS = ["../evil", "sub/../../evil", "/abs/evil", "./evil", "a//evil"]


@pytest.fixture
def mem() -> fsspec.AbstractFileSystem:
    fs = fsspec.filesystem("memory")  # one store per process: start and end empty
    if fs.exists("/kd"):
        fs.rm("/kd", recursive=True)
    yield fs
    if fs.exists("/kd"):
        fs.rm("/kd", recursive=True)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("KDPIPE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("key", BAD_KEYS)
def test_join_refuses_every_escaping_key(tmp_path, mem, key):
    store = Store("memory://kd/c", "cache")
    with pytest.raises(KdpipeError, match="refusing"):
        store.join(tmp_path / "in", key)
    assert store.join(tmp_path / "in", "shards/shard-00000.parquet") == (
        tmp_path / "in" / "shards" / "shard-00000.parquet").resolve()


def test_join_refuses_a_key_that_leaves_through_a_symlink(tmp_path, mem):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "in" / "link").symlink_to(tmp_path / "out")
    with pytest.raises(KdpipeError, match="outside"):
        Store("memory://kd/c", "cache").join(tmp_path / "in", "link/evil")


@pytest.mark.parametrize("key", ["../evil", "sub/../../evil", "/abs/evil"])
def test_mirroring_a_cache_with_an_escaping_key_is_one_line_and_writes_nothing_outside(
        tmp_path, mem, home, reference_cache, kdpipe_inproc, one_line_error, key):
    mem.put(str(reference_cache) + "/", "/kd/c", recursive=True)
    mem.pipe(f"/kd/c/{key}", b"escaped")
    before = files_under(tmp_path)
    one_line_error(kdpipe_inproc("cache", "verify", "memory://kd/c"), "memory://kd/c", repr(key))
    assert files_under(tmp_path) == before  # the mirror folder came and went; nothing escaped
    assert not any(p.name == "evil" for p in tmp_path.rglob("*"))


def test_a_clean_memory_cache_still_verifies(mem, home, reference_cache, kdpipe_inproc):
    mem.put(str(reference_cache) + "/", "/kd/c", recursive=True)
    r = kdpipe_inproc("cache", "verify", "memory://kd/c")
    assert r.returncode == 0, r.stderr


def test_pulling_a_report_or_a_run_with_an_escaping_key_is_refused(tmp_path, mem):
    staging = tmp_path / "staging"
    staging.mkdir()
    mem.pipe("/kd/report/settings.json", b"{}")
    mem.pipe("/kd/report/parts/../../../evil", b"escaped")
    with pytest.raises(KdpipeError, match="refusing"):
        prepare_report(Store("memory://kd/report", "report directory"), staging)
    mem.pipe("/kd/run/run.json", json.dumps({}).encode())
    mem.pipe("/kd/run/checkpoints/step-0000003/checkpoint.json", b"{}")
    mem.pipe("/kd/run/checkpoints/step-0000003/../../../evil", b"escaped")
    with pytest.raises(KdpipeError, match="refusing"):
        prepare_run(Store("memory://kd/run", "run directory"), staging)
    assert not any(p.name == "evil" for p in tmp_path.rglob("*"))
