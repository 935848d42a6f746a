"""Streaming the cache: every row once per epoch, a deterministic order, an exact data position."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import plain_rows, split_row_groups
from kdpipe.pipeline.cache import load_manifest
from kdpipe.pipeline.errors import CorruptCacheError
from kdpipe.pipeline.loader import (
    DataPosition, LoaderSpec, Prefetcher, batches_per_epoch, iter_batches,
)


def rows_of(batches) -> list[tuple[int, int]]:
    return [(int(s), int(v)) for b in batches for s, v in zip(b.seq_id, b.view)]


def spec(**kw) -> LoaderSpec:
    base = dict(seed=3, window=4, batch_size=7, batch_tokens=None, temperature_index=1, pad_id=0)
    base.update(kw)
    return LoaderSpec(**base)


@pytest.fixture(scope="module")
def manifest(reference_cache: Path):
    return load_manifest(reference_cache)


@pytest.fixture(scope="module")
def all_rows(reference_cache: Path, manifest) -> set[tuple[int, int]]:
    t = pq.read_table([reference_cache / e.path for e in manifest.shards], columns=["seq_id", "view"])
    return set(zip(t.column("seq_id").to_pylist(), t.column("view").to_pylist()))


def test_each_epoch_is_every_row_once_in_a_seeded_order(reference_cache, manifest, all_rows):
    batches = list(iter_batches(reference_cache, manifest, spec(), DataPosition(0, 0), epochs=2))
    per_epoch = [rows_of(b for b in batches if math.ceil(b.epoch_progress) - 1 == e) for e in (0, 1)]
    for rows in per_epoch:
        assert len(rows) == len(set(rows)) == len(all_rows) and set(rows) == all_rows
    assert per_epoch[0] != per_epoch[1]
    again = list(iter_batches(reference_cache, manifest, spec(), DataPosition(0, 0), epochs=2))
    assert rows_of(again) == rows_of(batches)
    other_seed = list(iter_batches(reference_cache, manifest, spec(seed=4), DataPosition(0, 0), epochs=1))
    assert rows_of(other_seed) != per_epoch[0]
    # a batch never crosses an epoch's end, and the position after an epoch's last batch is the next epoch
    ends = [b.position for b in batches if b.position.index == 0]
    assert ends == [DataPosition(1, 0), DataPosition(2, 0)]
    assert len(batches) == sum(batches_per_epoch(reference_cache, manifest, spec(), 2))


@pytest.mark.parametrize("kw", [dict(batch_size=7), dict(batch_size=None, batch_tokens=100)])
def test_resuming_at_any_batch_boundary_gives_the_same_rest(reference_cache, manifest, kw):
    s = spec(**kw)
    full = list(iter_batches(reference_cache, manifest, s, DataPosition(0, 0), epochs=2))
    flat = rows_of(full)
    assert len(full) == sum(batches_per_epoch(reference_cache, manifest, s, 2))
    done = 0
    for i, b in enumerate(full[:-1]):
        done += len(b.seq_id)
        if i % 4:
            continue
        rest = list(iter_batches(reference_cache, manifest, s, b.position, epochs=2))
        assert [len(x.seq_id) for x in rest] == [len(x.seq_id) for x in full[i + 1:]]
        assert rows_of(rest) == flat[done:]  # nothing skipped, nothing repeated
        assert all(np.array_equal(x.input_ids, y.input_ids) and np.array_equal(x.topk_ids, y.topk_ids)
                   for x, y in zip(rest[:2], full[i + 1:i + 3]))


def test_batch_tokens_bounds_the_padded_batch(reference_cache, manifest):
    for b in iter_batches(reference_cache, manifest, spec(batch_size=None, batch_tokens=100),
                          DataPosition(0, 0), epochs=1):
        assert b.input_ids.numel() <= 100 or b.input_ids.shape[0] == 1


def assert_rows_match(batch, by_key: dict, temperature_index: int) -> None:
    """Every row of `batch` holds its cached row's values, token for token, at its place."""
    pos = 0
    mlm = set(batch.mlm_index.tolist())
    labels = dict(zip(batch.mlm_index.tolist(), batch.mlm_labels.tolist()))
    hidden, logits, log_z = (batch.hidden.float(), batch.topk_logits.float(), batch.log_z.float())
    for b, key in enumerate(zip(batch.seq_id.tolist(), batch.view.tolist())):
        r = by_key[key]
        n = r["length"]
        assert batch.input_ids[b, :n].tolist() == r["input_ids"] and batch.attention_mask[b].sum() == n
        assert batch.topk_ids[pos:pos + n].tolist() == r["topk_ids"].tolist()
        assert np.allclose(logits[pos:pos + n].numpy(), np.array(r["topk_logits"], dtype=np.float32))
        assert np.allclose(log_z[pos:pos + n].numpy(), np.array(r["log_z"], dtype=np.float32)[:, temperature_index])
        assert np.allclose(hidden[pos:pos + n].numpy(), np.array(r["hidden"], dtype=np.float32))
        assert {pos + p for p in r["mlm_positions"]} <= mlm
        assert [labels[pos + p] for p in r["mlm_positions"]] == r["mlm_labels"]
        pos += n
    assert batch.tokens == pos == batch.topk_ids.shape[0]


def test_batches_hold_the_cached_rows_token_for_token(reference_cache, manifest):
    t = plain_rows(pq.read_table([reference_cache / e.path for e in manifest.shards]))
    batch = next(iter_batches(reference_cache, manifest, spec(temperature_index=2), DataPosition(0, 0)))
    assert_rows_match(batch, {(r["seq_id"], r["view"]): r for r in t}, 2)


def test_batches_gather_across_shards_and_row_groups(copy_cache, all_rows):
    """Shards of one row group per row, windows of two shards: the loader gathers every batch
    from the row groups where they lie (no joined copy), and each row still holds its own values;
    the epoch still holds every row once, in the same batches as one row group per shard gives."""
    cache = copy_cache()
    m = load_manifest(cache)
    before = list(iter_batches(cache, m, spec(window=2), DataPosition(0, 0), epochs=1))
    split_row_groups(cache, 1)
    m = load_manifest(cache)
    assert all(pq.ParquetFile(cache / e.path).num_row_groups == e.rows for e in m.shards)
    assert max(e.rows for e in m.shards) > 1
    t = plain_rows(pq.read_table([cache / e.path for e in m.shards]))
    by_key = {(r["seq_id"], r["view"]): r for r in t}
    after = list(iter_batches(cache, m, spec(window=2), DataPosition(0, 0), epochs=1))
    for batch in after:
        assert_rows_match(batch, by_key, 1)
    assert set(rows_of(after)) == all_rows and len(rows_of(after)) == len(all_rows)
    assert [set(rows_of([b])) for b in after] == [set(rows_of([b])) for b in before]


def test_targets_travel_as_stored_and_are_widened_where_used(reference_cache, manifest):
    """A batch holds the float targets in the shard's float16 (half the bytes to pin and copy);
    `to(device)` widens them to float32 there, value for value, and leaves the integers alone."""
    import torch

    batch = next(iter_batches(reference_cache, manifest, spec(), DataPosition(0, 0)))
    assert batch.hidden.dtype == batch.topk_logits.dtype == torch.float16
    used = batch.to(torch.device("cpu"))
    assert used.hidden.dtype == used.topk_logits.dtype == used.log_z.dtype == torch.float32
    assert used.hidden.equal(batch.hidden.float()) and used.topk_logits.equal(batch.topk_logits.float())
    assert used.input_ids is batch.input_ids and used.topk_ids.dtype == torch.int64


def test_a_bad_value_in_a_later_row_group_is_named_by_its_row_in_the_shard(copy_cache):
    import random

    import tamper

    for seed in range(20):  # a NaN in a row past a shard's first row (each row a row group below)
        cache = copy_cache(f"cache-{seed}")
        done = tamper.corrupt(cache, "nan", random.Random(seed))
        if int(done["what"].split()[2]) >= 1:
            break
    assert int(done["what"].split()[2]) >= 1
    split_row_groups(cache, 1)
    shard, _, row, column = done["what"].split()
    with pytest.raises(CorruptCacheError, match=rf"{shard}.*row {row} \(sequence \d+, view \d+\): {column}"):
        list(iter_batches(cache, load_manifest(cache), spec(), DataPosition(0, 0), epochs=1))


def test_a_reused_read_buffer_never_backs_a_decoded_column(tmp_path):
    """read_hashed hashes what it reads, block by block, into a buffer the next shard reuses; any
    decoded column that points into that buffer is copied out before the buffer is reused."""
    import hashlib

    from kdpipe.pipeline.fsutil import read_hashed
    from kdpipe.pipeline.loader import _own
    from kdpipe.pipeline.shards import ShardData

    buf = bytearray(1 << 20)
    for size in (0, 1, 300_000, 1 << 20):
        f = tmp_path / f"f{size}"
        f.write_bytes(np.random.default_rng(size).bytes(size))
        view, digest = read_hashed(f, size, buf)
        assert bytes(view) == f.read_bytes() and digest == hashlib.sha256(f.read_bytes()).hexdigest()
    buf[64:80] = bytes(range(1, 17))
    inside = np.frombuffer(buf, dtype=np.uint16, count=8, offset=64)
    expected = inside.tolist()
    data = ShardData(seq_id=np.arange(2), view=np.zeros(2, np.uint8), length=np.array([4, 4]),
                     input_ids=inside, mlm_count=np.zeros(2, np.int64), mlm_positions=np.zeros(0, np.uint16),
                     mlm_labels=np.zeros(0, np.uint16))
    kept = data.seq_id
    _own([data], buf)
    assert data.seq_id is kept  # memory of its own: left as it is
    buf[64:80] = bytes(16)  # the next shard read into the buffer
    assert data.input_ids.tolist() == expected and inside.tolist() == [0] * 8


def test_read_buffers_are_shared_by_threads_and_never_lent_twice():
    """A buffer given back is the next taker's, from any thread; two takers at once get two."""
    from kdpipe.pipeline.loader import _ReadBuffers

    pool = _ReadBuffers()
    a = pool.take(100)
    b = pool.take(50)
    assert a is not b and len(a) >= 100 and len(b) >= 50
    pool.give(b)
    pool.give(a)
    got = []
    t = threading.Thread(target=lambda: got.append(pool.take(80)))
    t.start()
    t.join()
    assert got[0] is a  # the largest free one, reused: no fresh memory
    assert len(pool.take(1000)) >= 1000  # grown where none is large enough


def test_a_corrupt_shard_is_refused_when_reached(copy_cache):
    cache = copy_cache()
    m = load_manifest(cache)
    victim = cache / m.shards[-1].path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match="shard"):
        for _ in iter_batches(cache, m, spec(), DataPosition(0, 0), epochs=1):
            pass


def test_prefetcher_yields_the_same_batches_and_raises_the_threads_errors(reference_cache, manifest):
    direct = rows_of(iter_batches(reference_cache, manifest, spec(), DataPosition(0, 0), epochs=1))
    p = Prefetcher(iter_batches(reference_cache, manifest, spec(), DataPosition(0, 0), epochs=1), depth=2)
    assert rows_of(p) == direct
    p.close()

    def failing():
        yield from itertools.islice(iter_batches(reference_cache, manifest, spec(), DataPosition(0, 0)), 2)
        raise RuntimeError("decode failed")

    p = Prefetcher(failing(), depth=2)
    with pytest.raises(RuntimeError, match="decode failed"):
        list(p)
    p.close()
    early = Prefetcher(iter_batches(reference_cache, manifest, spec(), DataPosition(0, 0)), depth=1)
    next(iter(early))
    early.close()  # stops an endless stream without hanging
    assert not early._thread.is_alive()


def test_a_shard_changed_after_its_first_check_is_caught_on_the_next_open(copy_cache):
    """open_shard hashes a shard once per process, but any rewrite of the file is hashed again."""
    from kdpipe.pipeline.cache import open_shard

    cache = copy_cache()
    m = load_manifest(cache)
    entry = m.shards[0]
    path = open_shard(cache, entry)  # verified and remembered
    assert open_shard(cache, entry) == path  # remembered: no second hash needed
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCacheError, match=entry.path):
        open_shard(cache, entry)


def test_a_shard_is_read_once_and_parsed_from_the_bytes_that_were_hashed(copy_cache):
    """shard_source reads a shard's file once and hands back the very bytes it hashed (the loader
    parses those, not the file again); a shard checked before in this process is read from its
    path; bytes that differ from the manifest's are refused before anything parses them."""
    import hashlib

    from kdpipe.pipeline.cache import _verified, shard_source
    from kdpipe.pipeline.shards import iter_row_groups

    cache = copy_cache()
    m = load_manifest(cache)
    entry = m.shards[1]
    path, raw = shard_source(cache, entry)
    assert raw is not None and hashlib.sha256(raw).hexdigest() == entry.sha256
    from_bytes, from_path = list(iter_row_groups(raw)), list(iter_row_groups(path))
    assert len(from_bytes) == len(from_path)
    for a, b in zip(from_bytes, from_path):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.hidden, b.hidden)
    assert shard_source(cache, entry) == (path, None)  # checked already: read from the path
    _verified.clear()
    data = bytearray(raw)
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))  # same size, other bytes
    with pytest.raises(CorruptCacheError, match="SHA-256"):
        shard_source(cache, entry)
    path.write_bytes(raw[:-1])
    with pytest.raises(CorruptCacheError, match="size"):
        shard_source(cache, entry)


BATCH_TENSORS = ("input_ids", "attention_mask", "mlm_index", "mlm_labels", "hidden", "topk_ids",
                 "topk_logits", "log_z")


@pytest.mark.parametrize("readers", ["processes", "threads"])
@pytest.mark.parametrize("part", [(0, 1), (1, 2)])
def test_loader_workers_give_the_same_batches(reference_cache, manifest, part, readers, monkeypatch, tmp_path,
                                              capsys):
    """Decoding windows ahead in worker processes (or threads, where /dev/shm cannot be used:
    said once on stderr) and collating in threads changes nothing a batch holds, from the start
    or from a resumed position, alone or as one rank's share."""
    from kdpipe.pipeline import shard_readers

    assert shard_readers.why_not(reference_cache, manifest, 2) is None  # this machine has a /dev/shm
    monkeypatch.setattr(shard_readers, "_noted", set())
    if readers == "threads":
        monkeypatch.setattr(shard_readers, "SHM", tmp_path / "no-shm")
    s = spec(window=2)
    for start in (DataPosition(0, 0), DataPosition(0, 33), DataPosition(1, 5)):
        one = list(iter_batches(reference_cache, manifest, s, start, epochs=2, part=part))
        many = list(iter_batches(reference_cache, manifest, s, start, epochs=2, part=part, workers=3))
        assert len(many) == len(one) > 0
        for a, b in zip(one, many):
            assert a.position == b.position and a.epoch_progress == b.epoch_progress
            assert a.seq_id.tolist() == b.seq_id.tolist() and a.view.tolist() == b.view.tolist()
            for name in BATCH_TENSORS:
                assert getattr(a, name).equal(getattr(b, name)), name
            if part[1] > 1:
                assert a.part.global_tokens == b.part.global_tokens
    notes = [line for line in capsys.readouterr().err.splitlines() if "kdpipe: note" in line]
    if readers == "threads":
        assert len(notes) == 1 and "3 threads" in notes[0] and "no writable" in notes[0], notes
    else:
        assert not notes


def test_a_small_dev_shm_is_named_with_what_the_workers_need(reference_cache, manifest):
    """A /dev/shm too small for the readers' slots (a container's 64 MB) is the reason given."""
    from kdpipe.pipeline import shard_readers

    huge = manifest.model_copy(update={"shards": [e.model_copy(update={"bytes": 2**50}) for e in manifest.shards]})
    why = shard_readers.why_not(reference_cache, huge, 2)
    assert why is not None and "MiB free and the worker processes need" in why and "--shm-size" in why


def test_a_corrupt_shard_is_refused_by_the_worker_threads_too(copy_cache):
    cache = copy_cache()
    m = load_manifest(cache)
    p = cache / m.shards[-1].path
    p.write_bytes(p.read_bytes()[:-9] + b"corrupted")
    with pytest.raises(CorruptCacheError, match="corrupt cache"):
        list(iter_batches(cache, m, spec(window=1), DataPosition(0, 0), epochs=1, workers=2))


def test_a_bad_value_is_named_alike_by_the_worker_processes(copy_cache):
    """A shard's first bad value, found in a reader process, reaches the loader as the same one-line
    error the loader itself raises (the error crosses the process boundary intact)."""
    import random

    import tamper

    cache = copy_cache()
    tamper.corrupt(cache, "nan", random.Random(3))
    m = load_manifest(cache)
    errors = []
    for workers in (1, 2):
        with pytest.raises(CorruptCacheError) as e:
            list(iter_batches(cache, m, spec(window=1), DataPosition(0, 0), epochs=1, workers=workers))
        errors.append(str(e.value))
    assert errors[0] == errors[1] and "nothing was trained on it" in errors[0]


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_a_slot_is_never_reused_while_a_shard_in_it_is_in_use(reference_cache, manifest):
    """A reader process writes each shard into a slot of shared memory that the loader's arrays are
    views of: a slot goes back to the free list only when the last view of it is gone (here a
    torch tensor made from one), and is then reused; the views hold what `read_parts` reads."""
    import gc

    import torch

    from kdpipe.pipeline.loader import read_parts
    from kdpipe.pipeline.shard_readers import SHM, ProcessReaders

    a, b = manifest.shards[0], manifest.shards[1]
    pool = ProcessReaders(1)
    try:
        first = pool.submit(reference_cache, a, manifest).result()
        kept = torch.from_numpy(first[0].hidden[2:5].copy()), torch.from_numpy(first[0].hidden[2:5])
        assert not first[0].hidden.flags.writeable  # the loader reads the slot, never writes it
        del first
        gc.collect()
        second = pool.submit(reference_cache, b, manifest).result()  # slot 0 is still in use: a new one
        assert len(pool._names) == 2 and kept[1].equal(kept[0])
        expected = read_parts(reference_cache, b, manifest)
        for got, want in zip(second, expected):
            for name in ("input_ids", "mlm_positions", "hidden", "topk_ids", "topk_logits", "log_z"):
                assert np.array_equal(getattr(got, name), getattr(want, name)), name
        del kept, second
        gc.collect()
        pool.submit(reference_cache, a, manifest).result()
        assert len(pool._names) == 2  # a freed slot was reused
        files = [SHM / n for n in pool._names]
        assert all(f.exists() for f in files)
    finally:
        pool.close()
    assert not any(f.exists() for f in files)


def test_a_dead_reader_process_is_one_clear_error_and_the_next_loader_starts_afresh(reference_cache, manifest):
    import signal

    from kdpipe.pipeline import shard_readers
    from kdpipe.pipeline.errors import KdpipeError

    pool = shard_readers.readers(1)
    os.kill(pool.pids[0], signal.SIGKILL)
    for entry in manifest.shards[:2]:  # the death seen by the running job, then by the next submit
        with pytest.raises(KdpipeError, match=r"a loader worker process died while reading shards/.*workers 1"):
            pool.submit(reference_cache, entry, manifest).result(timeout=60)
    fresh = shard_readers.readers(1)
    assert fresh is not pool and not fresh.broken
    assert fresh.submit(reference_cache, manifest.shards[0], manifest).result(timeout=60)[0].rows > 0


def test_slot_files_of_a_killed_loader_are_swept():
    from kdpipe.pipeline.shard_readers import SHM, _sweep_stale

    dead = subprocess.Popen(["true"])
    dead.wait()  # a process id that is gone
    stale, mine = SHM / f"kdpipe-loader-{dead.pid}-0", SHM / f"kdpipe-loader-{os.getpid()}-999"
    stale.touch()
    mine.touch()
    try:
        _sweep_stale()
        assert not stale.exists() and mine.exists()
    finally:
        stale.unlink(missing_ok=True)
        mine.unlink(missing_ok=True)


def test_zero_loader_workers_is_refused(reference_cache, manifest):
    from kdpipe.pipeline.errors import KdpipeError

    with pytest.raises(KdpipeError, match="at least 1"):
        next(iter_batches(reference_cache, manifest, spec(), DataPosition(0, 0), workers=0))
