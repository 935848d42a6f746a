"""The CUDA path, checked where a CUDA device exists (skipped elsewhere; bench/gpu_check.sh runs
these): the teacher's pinned, non-blocking copies give what the CPU gives up to bf16 rounding,
pinned batches reach the device intact, and both stages run end to end on the device."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.cuda


def test_teacher_on_cuda_matches_the_cpu(teacher_model, tokenizer) -> None:
    from kdpipe.pipeline import projection as proj
    from kdpipe.pipeline.teacher import TeacherRunner

    width = teacher_model.config.hidden_size
    p = proj.random_orthogonal(width, 8, 0)
    ids = torch.randint(5, len(tokenizer), (4, 24))
    att = torch.ones_like(ids)
    att[1, 20:] = 0
    target = att.bool() & (torch.rand(ids.shape) < 0.3)
    target[0, 0] = True
    outs = {}
    for device in ("cpu", "cuda"):
        model = type(teacher_model)(teacher_model.config)
        model.load_state_dict(teacher_model.state_dict())
        runner = TeacherRunner(model.eval(), 5, (1.0, 2.0), p, torch.device(device))
        outs[device] = runner.run(ids, att, target)
    cpu, gpu = outs["cpu"], outs["cuda"]
    assert gpu.hidden.shape == cpu.hidden.shape == (int(att.sum()), 8)
    assert gpu.topk_ids.shape == cpu.topk_ids.shape == (int(target.sum()), 5)
    assert np.abs(gpu.hidden - cpu.hidden).max() < 0.1  # bf16 autocast on CUDA
    assert np.abs(gpu.log_z - cpu.log_z).max() < 0.1
    assert (gpu.topk_ids[:, 0] == cpu.topk_ids[:, 0]).mean() > 0.9


def test_pinned_batches_reach_the_device_intact(reference_cache: Path) -> None:
    from kdpipe.pipeline.cache import load_manifest
    from kdpipe.pipeline.loader import DataPosition, LoaderSpec, iter_batches

    m = load_manifest(reference_cache)
    spec = LoaderSpec(seed=0, batch_size=8, temperature_index=0)
    plain = list(iter_batches(reference_cache, m, spec, DataPosition(0, 0), epochs=1))
    pinned = list(iter_batches(reference_cache, m, spec, DataPosition(0, 0), epochs=1, workers=2,
                               pin_memory=True))
    assert len(plain) == len(pinned)
    for a, b in zip(plain, pinned):
        assert b.input_ids.is_pinned() and b.hidden.is_pinned()
        on = b.to(torch.device("cuda"))
        torch.cuda.synchronize()
        assert on.input_ids.is_cuda and on.input_ids.cpu().equal(a.input_ids)
        assert on.topk_logits.dtype == on.hidden.dtype == torch.float32  # widened on the device
        assert on.topk_logits.cpu().equal(a.to(torch.device("cpu")).topk_logits)


def test_both_stages_on_cuda(tmp_path: Path, kdpipe_cli, teacher_dir: Path, corpus_file: Path, dump_args) -> None:
    """A dump with parallel writers on the device, verified, resumed to the same bytes; a short
    student run on the device that reports its data wait."""
    out = tmp_path / "cache"
    kdpipe_cli("teacher-dump", "--teacher", teacher_dir, "--data", corpus_file, "--out", out, *dump_args,
               "--device", "cuda", "--writers", "2")
    assert kdpipe_cli("cache", "verify", out, check=False).returncode == 0
    shards = sorted((out / "shards").glob("shard-*.parquet"))
    first = {p.name: p.read_bytes() for p in shards}
    for p in shards[-3:]:
        p.unlink()
    (out / "manifest.json").unlink()
    kdpipe_cli("teacher-dump", "--teacher", teacher_dir, "--data", corpus_file, "--out", out, *dump_args,
               "--device", "cuda", "--writers", "1")
    assert {p.name: p.read_bytes() for p in sorted((out / "shards").glob("shard-*.parquet"))} == first
    run = tmp_path / "run"
    kdpipe_cli("student-train", "--cache", out, "--out", run, "--device", "cuda", "--temperature", "1.5",
               "--batch-size", "8", "--max-steps", "6", "--log-every", "2", "--loader-workers", "2")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines and all(0 <= ln["data_wait_pct"] <= 100 for ln in lines)


def test_fp16_and_compile_on_cuda(tmp_path: Path, kdpipe_cli, reference_cache: Path, teacher_dir: Path,
                                  corpus_file: Path, dump_args) -> None:
    """fp16 with its loss scaler, and inductor (which generates Triton kernels on CUDA), in both
    stages on the device: they run, and record what they did."""
    run = tmp_path / "run"
    kdpipe_cli("student-train", "--cache", reference_cache, "--out", run, "--device", "cuda", "--temperature",
               "1.5", "--batch-size", "8", "--max-steps", "6", "--log-every", "1", "--save-every", "3",
               "--precision", "fp16", "--torch-compile", timeout=600)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(np.isfinite(ln["loss"]) and ln["loss_scale"] > 0 for ln in lines)
    meta = json.loads((run / "checkpoints" / "step-0000006" / "checkpoint.json").read_text())
    assert meta["grad_scaler"]["scale"] > 0
    assert json.loads((run / "run.json").read_text())["identity"]["torch_compile"]["backend"] == "inductor"
    out = tmp_path / "cache"
    kdpipe_cli("teacher-dump", "--teacher", teacher_dir, "--data", corpus_file, "--out", out, *dump_args,
               "--max-sequences", "16", "--device", "cuda", "--precision", "bf16", "--torch-compile", timeout=600)
    fp = json.loads((out / "manifest.json").read_text())["fingerprint"]["teacher"]
    assert fp["precision"] == "bf16" and fp["torch_compile"] == {"backend": "inductor", "mode": None}
