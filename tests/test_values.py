"""Meaning, not only bytes: a cache re-hashed after a semantic corruption (tests/tamper.py) is
refused by `cache verify --deep` and by `student-train` in one line naming the shard and row, and
neither changes the cache; a teacher whose logits overflow float16 is refused by the dump before
any shard is stored."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import tamper
from kdpipe.pipeline import values
from kdpipe.pipeline.shards import from_table, read_fingerprint, to_table, write_shard

TRAIN = ("--temperature", "1.5", "--batch-size", "8", "--seed", "0", "--epochs", "1", "--init", "random")


def corrupt_copy(copy_cache, kind: str, seed: int) -> tuple[Path, dict]:
    cache = copy_cache(f"cache-{kind}-{seed}")
    return cache, tamper.corrupt(cache, kind, random.Random(seed))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", tamper.KINDS)
def test_a_semantic_corruption_is_refused_by_deep_verify_and_by_training(
        tmp_path, copy_cache, kdpipe_inproc, one_line_error, digest, kind, seed):
    cache, done = corrupt_copy(copy_cache, kind, seed)
    before = digest(cache)
    shallow = kdpipe_inproc("cache", "verify", cache)
    if kind == "fingerprint":  # the footers disagree with the manifest: bytes-level verify sees it
        one_line_error(shallow, "problem(s)")
        assert "footer carries the fingerprint" in shallow.stderr
    else:
        assert shallow.returncode == 0, shallow.stderr  # re-hashed: the bytes verify
    deep = kdpipe_inproc("cache", "verify", "--deep", cache)
    one_line_error(deep, "problem(s)")
    corrupt_lines = [ln for ln in deep.stderr.splitlines() if ln.startswith("CORRUPT")]
    assert len(corrupt_lines) >= 1, deep.stderr
    if kind != "fingerprint" or "footer" in done["what"]:
        shard = done["what"].split()[0]
        assert any(ln.startswith(f"CORRUPT {shard}: ") for ln in corrupt_lines), (done, deep.stderr)
    run = tmp_path / "run"
    line = one_line_error(kdpipe_inproc("student-train", "--cache", cache, "--out", run, *TRAIN), "corrupt cache")
    assert "shard-" in line and "Traceback" not in line
    if kind not in ("fingerprint", "count"):
        assert "row " in line and "sequence " in line  # names the row and its (sequence, view)
    assert not (run / "final").exists()
    assert digest(cache) == before


def test_a_clean_cache_passes_the_deep_check(reference_cache, kdpipe_inproc):
    r = kdpipe_inproc("cache", "verify", "--deep", reference_cache)
    assert r.returncode == 0 and "ok:" in r.stdout, r.stderr


def test_deep_verify_checks_log_z_against_the_top_k(copy_cache, kdpipe_inproc, one_line_error):
    """log Z[T] below logsumexp of the stored top-k would make the tail mass negative (target
    position 2 is in row 0: rows hold about 32 tokens)."""
    cache = copy_cache("logz")
    m = json.loads((cache / "manifest.json").read_text())
    path = cache / m["shards"][3]["path"]
    table = pq.read_table(path)
    data = from_table(table)
    log_z = data.log_z.copy()
    log_z[2, 1] = float(data.topk_logits[2].astype(np.float32).max()) / m["temperatures"][1] - 3.0
    data.log_z = log_z
    write_shard(path, to_table(data, table.schema.remove_metadata()), read_fingerprint(path), 3)
    tamper._rehash(cache, m)
    assert kdpipe_inproc("cache", "verify", cache).returncode == 0
    deep = kdpipe_inproc("cache", "verify", "--deep", cache)
    one_line_error(deep, "1 problem(s)")
    assert f"CORRUPT {m['shards'][3]['path']}: row 0 " in deep.stderr and "log_z at T=1.5" in deep.stderr


@pytest.mark.parametrize("writers", ["1", "2"])
def test_a_teacher_whose_logits_overflow_float16_is_refused_before_any_shard(
        tmp_path, teacher_dir, small_corpus_file, kdpipe_inproc, one_line_error, dump_args, writers):
    """With several writers the check runs in a writer thread (it gathers the shard): the same
    one-line refusal, nothing stored."""
    from transformers import BertForMaskedLM

    teacher = tmp_path / "teacher"
    model = BertForMaskedLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        model.cls.predictions.bias[7] = 1e5  # one large decoder bias: every position's top logit
    model.save_pretrained(teacher)
    for f in teacher_dir.iterdir():
        if f.name.startswith(("vocab", "tokenizer", "special")):
            (teacher / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "cache"
    one_line_error(kdpipe_inproc("teacher-dump", "--teacher", teacher, "--data", small_corpus_file, "--out", out,
                                 *dump_args, "--writers", writers),
                   "shard 0", "not written", "sequence 0", "topk_logits holds 100000", "65504", "fix the teacher")
    assert not list((out / "shards").glob("*.parquet")) and not (out / "manifest.json").exists()


def test_checks_name_the_first_bad_row_of_each_kind(reference_cache):
    """The vectorised checks on decoded arrays, one fault of each kind planted by hand."""
    from kdpipe.pipeline.cache import load_manifest
    from kdpipe.pipeline.loader import read_shard

    m = load_manifest(reference_cache)
    entry = m.shards[5]
    lim = values.limits_of(m)
    clean = read_shard(reference_cache, entry, m)
    values.check(clean, lim, entry.first_seq, entry.num_seqs, deep=True)

    def planted(column: str, value, index=-1) -> str:
        import copy

        d = copy.copy(clean)
        arr = getattr(d, column).copy()
        arr.reshape(len(arr), -1)[index] = value
        setattr(d, column, arr)
        with pytest.raises(values.ValueProblem) as e:
            values.check(d, lim, entry.first_seq, entry.num_seqs)
        return str(e.value)

    last = clean.rows - 1
    assert planted("hidden", np.nan).startswith(f"row {last} ") and "hidden holds nan" in planted("hidden", np.nan)
    assert "topk_ids holds 110, not below the vocabulary size 110" in planted("topk_ids", 110)
    assert "input_ids holds 65535" in planted("input_ids", 65535)
    assert planted("seq_id", entry.first_seq + entry.num_seqs).endswith(
        f"outside this shard's sequences {entry.first_seq}..{entry.first_seq + entry.num_seqs - 1}")
    assert "view is 1, but the cache has 1 view(s)" in planted("view", 1)
    assert "length is 33, outside 1..32" in planted("length", 33)


def test_the_float16_test_on_bits_agrees_with_isfinite_for_every_float16() -> None:
    """Each of the 65,536 float16 bit patterns among finite neighbours of either sign (and all the
    finite ones together): out of range exactly where it is not finite."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.isfinite(every)
    assert not values._out_of_range(every[finite], 65504.0) and values._out_of_range(every, 65504.0)
    neighbours = np.array([-65504.0, -1.0, 0.0, 1.0, 65504.0], np.float16)
    for i in range(1 << 16):
        v = np.concatenate([neighbours, every[i:i + 1], neighbours])
        assert values._out_of_range(v, 65504.0) == (not finite[i]), hex(i)
