"""fp16 training scales the loss (torch.amp.GradScaler, on CPU here as on CUDA): the scaler's state
travels in checkpoints so a resumed run is exact, an update whose gradients overflow is skipped
(normal in fp16) and not mistaken for divergence, a gradient that stays non-finite still stops
training, and fine-tuning in eval and teacher-adapt train in fp16 too."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from helpers import tiny_task
from kdpipe.pipeline.trainer import NonFiniteError, Optim, Trainer, _backward, _update, train_step
from kdpipe.schemas.checkpoint import STUDENT_FILE

ARGS = ("--temperature", "1.5", "--batch-size", "8", "--seed", "0", "--log-every", "1", "--precision", "fp16")
TIMING = ("tokens_per_s", "steps_per_s", "data_wait_pct")


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def scaler_state(run: Path, step: int) -> dict:
    return json.loads((run / "checkpoints" / f"step-{step:07d}" / "checkpoint.json").read_text())["grad_scaler"]


def test_fp16_trains_records_its_loss_scale_and_resumes_exactly(tmp_path, reference_cache, kdpipe_inproc):
    full = tmp_path / "full"
    r = kdpipe_inproc("student-train", "--cache", reference_cache, "--out", full, *ARGS, "--max-steps", "6",
                      "--save-every", "3")
    assert r.returncode == 0, r.stderr
    lines = metrics(full)
    assert len(lines) == 6 and all(math.isfinite(m["loss"]) and m["loss_scale"] > 0 for m in lines)
    assert all(m["skipped_updates"] == 0 and m["grad_norm"] > 0 for m in lines)
    assert json.loads((full / "run.json").read_text())["identity"]["precision"] == "fp16"
    assert scaler_state(full, 3)["_growth_tracker"] == 3 and scaler_state(full, 6)["_growth_tracker"] == 6

    # as if killed after the checkpoint at step 3: the rerun restores the scaler with the rest
    cut = Path(shutil.copytree(full, tmp_path / "cut"))
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-0000006")
    (cut / "checkpoints" / "latest").write_text("step-0000003\n")
    r = kdpipe_inproc("student-train", "--cache", reference_cache, "--out", cut, *ARGS, "--max-steps", "6",
                      "--save-every", "3")
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "resumed", r.stderr
    assert (cut / "final" / STUDENT_FILE).read_bytes() == (full / "final" / STUDENT_FILE).read_bytes()
    assert scaler_state(cut, 6) == scaler_state(full, 6)  # not restarted at 0 clean steps
    assert metrics(cut) == lines

    # a resume must repeat the precision: the scaler's state means nothing in fp32
    r = kdpipe_inproc("student-train", "--cache", reference_cache, "--out", full, *ARGS[:-2], "--max-steps", "9")
    assert r.returncode != 0 and "precision" in r.stderr and "Traceback" not in r.stderr


def _tiny_trainer(scale: float) -> Trainer:
    torch.manual_seed(0)
    model, hmap = torch.nn.Linear(4, 3), torch.nn.Linear(3, 2)
    params = [*model.parameters(), *hmap.parameters()]
    return Trainer(model, hmap, torch.optim.AdamW(params, lr=0.1), params, {},
                   scaler=torch.amp.GradScaler("cpu", init_scale=scale), body=model, head=model)


def _backward_ones(tr: Trainer, poison: float | None = None) -> None:
    """A scaled backward whose unscaled gradients are all 1, one entry replaced by `poison`."""
    tr.optimizer.zero_grad(set_to_none=True)
    _backward(tr, sum(p.sum() for p in tr.params))
    if poison is not None:
        tr.params[1].grad[0] = poison


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_an_overflow_is_skipped_until_the_scale_reaches_1_then_training_stops(clip):
    tr = _tiny_trainer(4.0)
    optim = Optim(0.1, (0.9, 0.98), 1e-6, 0.0, clip, 1)
    weights = [p.detach().clone() for p in tr.params]
    for scale in (4.0, 2.0):  # each overflow: no update, the scale halved
        assert tr.scaler.get_scale() == scale
        _backward_ones(tr, float("inf"))
        norm, skipped = _update(tr, optim, {"mlm": 1.0})
        assert skipped and not math.isfinite(norm)
        assert all(torch.equal(p, w) for p, w in zip(tr.params, weights)) and not tr.optimizer.state
    _backward_ones(tr, float("nan"))
    with pytest.raises(NonFiniteError, match="fp16 loss scale of 1 "):  # no smaller scale to try
        _update(tr, optim, {"mlm": 1.0})
    assert all(torch.equal(p, w) for p, w in zip(tr.params, weights)) and not tr.optimizer.state

    tr = _tiny_trainer(8.0)  # a clean update: the norm is of the unscaled gradients
    _backward_ones(tr)
    assert tr.params[0].grad.max() == 8.0
    norm, skipped = _update(tr, optim, {"mlm": 1.0})
    assert not skipped and norm == pytest.approx(math.sqrt(sum(p.numel() for p in tr.params)))
    assert not all(torch.equal(p, w) for p, w in zip(tr.params, weights))


def test_a_real_fp16_step_that_overflows_is_skipped_and_training_goes_on(reference_cache):
    """The student's real forward and backward in fp16 autocast, with a scale far too large: the
    scaled gradients overflow float16, each such update is skipped with the scale halved, and once
    the scale fits the student trains."""
    from kdpipe.stages import student_train as st

    s = st.set_up(st.StudentConfig(cache=str(reference_cache), out="unused", init="random", temperature=1.5,
                                   batch_size=8, max_steps=100, precision="fp16"))
    tr = st._trainer(s, None)
    assert isinstance(tr.scaler, torch.amp.GradScaler)
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)
    batches = st.open_stream(s, st.Position(0, 0))
    before = {k: v.clone() for k, v in tr.student.state_dict().items()}
    skipped = 0
    while True:
        res = train_step(tr, batches, st.loss_spec(s), s.teacher_head, s.optim, 1e-3, s.device, False)
        assert math.isfinite(res.sums["loss"])
        if not res.sums["skipped"]:
            break
        skipped += 1
        assert res.sums["grad_norm"] == 0.0 and tr.scaler.get_scale() == 2.0 ** (40 - skipped)
        assert all(torch.equal(v, before[k]) for k, v in tr.student.state_dict().items())
    assert 5 < skipped < 40 and res.sums["grad_norm"] > 0
    assert any(not torch.equal(v, before[k]) for k, v in tr.student.state_dict().items())


def test_eval_fine_tunes_in_fp16(tmp_path, teacher_dir, small_corpus_file, kdpipe_inproc):
    task = tiny_task(tmp_path / "task.jsonl")
    out = tmp_path / "report"
    r = kdpipe_inproc("eval", "--teacher", teacher_dir, "--student", f"s={teacher_dir}", "--task", task,
                      "--out", out, "--no-speed", "--seeds", "1", "--epochs", "2", "--batch-size", "4",
                      "--precision", "fp16")
    assert r.returncode == 0, r.stderr
    part = json.loads(next((out / "parts").glob("task/**/*.json")).read_text())
    assert 0 <= part["data"]["accuracy"] <= 1 and part["data"]["steps"] > 0
    assert json.loads((out / "eval.json").read_text())["settings"]["precision"] == "fp16"


def test_teacher_adapt_trains_in_fp16_and_records_it_only_then(tmp_path, teacher_dir, small_corpus_file,
                                                               kdpipe_inproc):
    args = ("--teacher", teacher_dir, "--data", small_corpus_file, "--seq-len", "32", "--max-sequences", "16",
            "--max-steps", "2", "--batch-size", "8", "--save-every", "2")
    r = kdpipe_inproc("teacher-adapt", *args, "--out", tmp_path / "a", "--precision", "fp16")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "a" / "teacher_adapt.json").read_text())["settings"]["precision"] == "fp16"
    assert json.loads((tmp_path / "a" / "run" / "run.json").read_text())["identity"]["precision"] == "fp16"
    assert (tmp_path / "a" / "model" / STUDENT_FILE).is_file()
    assert scaler_state(tmp_path / "a" / "run", 2)["scale"] > 0
    r = kdpipe_inproc("teacher-adapt", *args, "--out", tmp_path / "b")
    assert r.returncode == 0, r.stderr  # the default leaves the record as it was before the option existed
    assert "precision" not in json.loads((tmp_path / "b" / "teacher_adapt.json").read_text())["settings"]
