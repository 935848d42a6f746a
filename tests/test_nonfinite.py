"""A non-finite loss or gradient stops training in one line naming the step and the term, before
the update: the last good checkpoint stays, no final/ (or model/, or eval score) is published, and
a rerun stops at the same step again instead of training on. Checkpoints and models with
non-finite weights are never resumed from or published."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import tiny_task
from kdpipe.pipeline.fsutil import sha256_file
from kdpipe.schemas.checkpoint import STUDENT_FILE
from kdpipe.pipeline.trainer import NonFiniteError, Optim, Trainer, _update

DIVERGE = ("--temperature", "1.5", "--batch-size", "8", "--seed", "0", "--max-steps", "6", "--save-every", "1",
           "--log-every", "1", "--lr", "1e30", "--max-grad-norm", "0")


def without_lock(digest: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in digest.items() if not k.endswith(".lock")}


def test_a_diverging_run_stops_naming_the_step_keeps_its_checkpoint_and_stops_again(
        tmp_path, reference_cache, kdpipe_inproc, one_line_error, digest):
    run = tmp_path / "run"
    first = one_line_error(kdpipe_inproc("student-train", "--cache", reference_cache, "--out", run, *DIVERGE),
                           "step 2:", "loss is nan", "step-0000001 is kept", "no final/", "diverged")
    assert not (run / "final").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000001"
    before = without_lock(digest(run))
    again = one_line_error(kdpipe_inproc("student-train", "--cache", reference_cache, "--out", run, *DIVERGE))
    assert again == first  # resumed from step 1, met the same batch, stopped the same way
    assert without_lock(digest(run)) == before and not (run / "final").exists()


def test_a_checkpoint_with_non_finite_weights_is_not_resumed(tmp_path, reference_cache, kdpipe_cli, kdpipe_inproc,
                                                             one_line_error, digest):
    run = tmp_path / "run"
    args = ("--temperature", "1.5", "--batch-size", "8", "--seed", "0", "--max-steps", "6", "--save-every", "3")
    kdpipe_cli("student-train", "--cache", reference_cache, "--out", run, *args)
    shutil.rmtree(run / "final")
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    tensors = load_file(str(ckpt / STUDENT_FILE))
    name = sorted(k for k, t in tensors.items() if t.is_floating_point())[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(ckpt / STUDENT_FILE))
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    meta["files"][STUDENT_FILE] = sha256_file(ckpt / STUDENT_FILE)
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    before = digest(run)
    one_line_error(kdpipe_inproc("student-train", "--cache", reference_cache, "--out", run, *args),
                   str(ckpt), "non-finite weights")
    assert digest(run) == before and not (run / "final").exists()


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_an_update_with_a_non_finite_gradient_changes_nothing(clip):
    torch.manual_seed(0)
    model, hmap = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    params = [*model.parameters(), *hmap.parameters()]
    opt = torch.optim.AdamW(params, lr=0.1)
    tr = Trainer(model, hmap, opt, params, {})
    weights = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    params[1].grad[0] = float("inf")
    with pytest.raises(NonFiniteError, match="gradient norm is"):
        _update(tr, Optim(0.1, (0.9, 0.98), 1e-6, 0.0, clip, 1), {"mlm": 1.0})
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    assert not opt.state  # AdamW never stepped


def test_teacher_adapt_that_diverges_publishes_no_model(tmp_path, teacher_dir, small_corpus_file, kdpipe_inproc,
                                                        one_line_error):
    out = tmp_path / "adapt"
    one_line_error(kdpipe_inproc("teacher-adapt", "--teacher", teacher_dir, "--data", small_corpus_file, "--out", out,
                                 "--seq-len", "32", "--max-sequences", "24", "--max-steps", "4", "--batch-size", "8",
                                 "--warmup-steps", "0", "--lr", "1e30", "--save-every", "1"),
                   "step", "loss is", "no final/")
    assert not (out / "model").exists() and not (out / "run" / "final").exists()


def test_an_eval_fine_tuning_that_diverges_records_no_score(tmp_path, teacher_dir, small_corpus_file, kdpipe_inproc,
                                                            one_line_error):
    task = tiny_task(tmp_path / "task.jsonl")
    out = tmp_path / "report"
    proc = kdpipe_inproc("eval", "--teacher", teacher_dir, "--student", f"s={teacher_dir}", "--task", task,
                         "--heldout", small_corpus_file, "--out", out, "--no-speed", "--seeds", "1", "--epochs", "2",
                         "--batch-size", "4", "--lr", "1e30", "--seq-len", "32", "--heldout-sequences", "4")
    one_line_error(proc, "task task", "fine-tuning", "stopped at step", "no score is recorded")
    assert not (out / "report.json").exists()
    assert list((out / "parts" / "mlm").glob("*.json"))  # the masked-LM part before it was kept
    assert not list((out / "parts").glob("task/**/*.json"))
