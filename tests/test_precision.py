"""Precision is the user's choice: fp32 unless asked, bf16/fp16 autocast when asked, and a dump's
stored targets (and fingerprint) say which. fp16 training: tests/test_fp16.py."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import torch

from helpers import plain_rows
from kdpipe.pipeline import device as dev


def test_autocast_follows_the_precision_asked_for():
    cpu = torch.device("cpu")
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with dev.autocast(cpu, "fp32"):
        assert (a @ b).dtype == torch.float32
    with dev.autocast(cpu, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    assert dev.resolve_precision("auto", cpu) == "fp32"
    assert dev.resolve_precision("auto", torch.device("cuda")) == "bf16"
    dev.configure("bf16")
    try:
        with dev.autocast(cpu):  # the stage's choice where none is named
            assert (a @ b).dtype == torch.bfloat16
        with dev.autocast(cpu, "fp32"):  # the dump's teacher runner names its own
            assert (a @ b).dtype == torch.float32
    finally:
        dev.configure()


def test_a_bf16_dump_is_recorded_and_differs_from_the_fp32_default(tmp_path, teacher_dir, corpus_file,
                                                                    kdpipe_inproc, dump_args):
    def dump(name: str, *extra: str):
        r = kdpipe_inproc("teacher-dump", "--teacher", teacher_dir, "--data", corpus_file, "--out", tmp_path / name,
                          *dump_args, "--max-sequences", "8", *extra)
        assert r.returncode == 0, r.stderr
        return json.loads((tmp_path / name / "manifest.json").read_text())

    fp32, bf16 = dump("fp32"), dump("bf16", "--precision", "bf16")
    assert "precision" not in fp32["fingerprint"]["teacher"]  # the default adds nothing to old fingerprints
    assert bf16["fingerprint"]["teacher"]["precision"] == "bf16"
    assert bf16["fingerprint_sha256"] != fp32["fingerprint_sha256"]
    za, zb = (np.concatenate([r["topk_logits"] for r in plain_rows(pq.read_table(tmp_path / n / "shards"))])
              .astype(np.float32) for n in ("fp32", "bf16"))
    if za.shape == zb.shape:  # the same top-k ids give comparable logits: close, not equal
        assert not np.array_equal(za, zb) and np.abs(za - zb).max() < 0.5


def test_bf16_trains_and_a_resume_must_repeat_it(tmp_path, reference_cache, kdpipe_inproc):
    args = ("student-train", "--cache", reference_cache, "--temperature", "1.5", "--batch-size", "8",
            "--max-steps", "2", "--log-every", "1")
    r = kdpipe_inproc(*args, "--out", tmp_path / "b", "--precision", "bf16")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(m["loss"]) for m in lines)
    assert all("loss_scale" not in m for m in lines)  # only fp16 scales the loss
    record = json.loads((tmp_path / "b" / "run.json").read_text())
    assert record["identity"]["precision"] == "bf16"  # a resume must repeat it
