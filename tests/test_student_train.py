"""`kdpipe student-train` end to end: kill -9 and resume is bit-identical, refusals leave runs alone,
training reduces every loss term, and the final student loads without kdpipe."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kdpipe.pipeline.cli import cli
from kdpipe.stages.student_train import StudentConfig, main

# The session's reference cache stores temperatures 1, 1.5, 3 (165 rows in 85 shards).
BASE = ("--temperature", "1.5", "--batch-size", "8", "--seed", "0")
RESUME = (*BASE, "--epochs", "2", "--save-every", "3", "--log-every", "2", "--record-samples")
TIMING = ("tokens_per_s", "steps_per_s", "data_wait_pct")


def invoke(*args) -> "click.testing.Result":  # noqa: F821
    """The CLI in-process (no interpreter start-up): exit code and stderr as a user sees them."""
    return CliRunner().invoke(cli, ["student-train", *map(str, args)])


def assert_refused(result, *needles: str) -> str:
    assert result.exit_code != 0, result.stdout
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def untimed(ms: list[dict]) -> list[dict]:
    """Metrics lines without their timings (which no two runs share)."""
    return [{k: v for k, v in m.items() if k not in TIMING} for m in ms]


def samples(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, reference_cache, kdpipe_cli) -> Path:
    """An uninterrupted run, as a real subprocess (the reference for the kill/resume test)."""
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    kdpipe_cli("student-train", "--cache", reference_cache, "--out", out, *RESUME)
    return out


def partial_copy(run: Path, dest: Path) -> Path:
    """A copy of a run as if it had been killed after its checkpoint at step 39 (no final/, and
    not the checkpoint every run writes at its last step)."""
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "final")
    shutil.rmtree(dest / "checkpoints" / "step-0000042")
    (dest / "checkpoints" / "latest").write_text("step-0000039\n")
    return dest


# ------------------------------------------------------------------------- kill -9 and resume

@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, reference_cache, finished_run, kdpipe_popen,
                                                         kdpipe_cli):
    out = tmp_path / "killed"
    proc = kdpipe_popen("student-train", "--cache", reference_cache, "--out", out, *RESUME)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "the run finished before it could be killed"
    meta = json.loads((out / "checkpoints" / latest.read_text().strip() / "checkpoint.json").read_text())
    assert meta["position"]["epoch"] == 0 and 0 < meta["position"]["index"] < 165  # mid-epoch

    resumed = kdpipe_cli("student-train", "--cache", reference_cache, "--out", out, *RESUME)
    assert json.loads(resumed.stdout)["status"] == "resumed"
    for f in ("model.safetensors", "kdpipe_hidden_map.safetensors"):
        assert (out / "final" / f).read_bytes() == (finished_run / "final" / f).read_bytes(), f
    # the same rows in the same steps: none skipped, none repeated across the resume
    assert samples(out) == samples(finished_run)
    assert untimed(metrics(out)) == untimed(metrics(finished_run))


def test_loader_worker_processes_train_the_same_run(tmp_path, reference_cache, finished_run, kdpipe_cli):
    """The real command with its shards read by worker processes (spawned from the console script,
    handing shards back through /dev/shm) trains the same rows in the same steps to the same
    weights as the uninterrupted run, and leaves no shared-memory file behind."""
    from kdpipe.pipeline.shard_readers import SHM

    before = set(SHM.glob("kdpipe-loader-*"))
    out = tmp_path / "workers"
    kdpipe_cli("student-train", "--cache", reference_cache, "--out", out, *RESUME, "--loader-workers", "2")
    assert samples(out) == samples(finished_run)
    assert untimed(metrics(out)) == untimed(metrics(finished_run))
    assert (out / "final" / "model.safetensors").read_bytes() == (finished_run / "final" / "model.safetensors").read_bytes()
    assert set(SHM.glob("kdpipe-loader-*")) <= before


def test_every_epoch_sees_every_row_once(finished_run, reference_cache):
    import pyarrow.parquet as pq

    t = pq.read_table(reference_cache / "shards", columns=["seq_id", "view"])
    everything = sorted(zip(t.column("seq_id").to_pylist(), t.column("view").to_pylist()))
    steps = samples(finished_run)
    per_epoch = -(-len(everything) // 8)
    assert len(steps) == 2 * per_epoch
    for e in range(2):
        rows = [tuple(r) for s in steps[e * per_epoch:(e + 1) * per_epoch] for r in s["rows"]]
        assert sorted(rows) == everything


def test_final_loads_without_kdpipe_and_metrics_have_their_names(finished_run):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(finished_run / "final")
    tok = AutoTokenizer.from_pretrained(finished_run / "final")
    assert model.config.num_hidden_layers == 1 and len(tok) == model.config.vocab_size
    with torch.no_grad():
        assert model(**tok("the film", return_tensors="pt")).logits.shape[-1] == len(tok)
    lines = metrics(finished_run)
    keys = ("step", "loss", "loss_ce", "loss_mlm", "loss_cos", "lr", "tokens_per_s", "epoch")
    assert all(set(keys) <= set(m) for m in lines) and lines[-1]["step"] == 42 and lines[-1]["epoch"] == 2.0
    record = json.loads((finished_run / "run.json").read_text())
    assert record["init"]["layer_map"] == [0] and record["total_steps"] == 42
    kept = sorted(p.name for p in (finished_run / "checkpoints").iterdir())
    assert kept == ["latest", "step-0000036", "step-0000039", "step-0000042"]  # the last step included


def test_rerunning_a_finished_run_changes_nothing(finished_run, reference_cache, digest):
    before = digest(finished_run)
    r = invoke("--cache", reference_cache, "--out", finished_run, *RESUME)
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "already complete"
    assert digest(finished_run) == before


# --------------------------------------------------------------------------------- refusals

def test_bad_input_is_refused_in_one_line_and_leaves_the_run_untouched(
        tmp_path, finished_run, reference_cache, copy_cache, digest):
    run = partial_copy(finished_run, tmp_path / "run")
    before = digest(run)

    cases = [
        (("--cache", tmp_path / "nope", *RESUME), ("does not exist",)),
        (("--cache", reference_cache, *RESUME, "--alpha-ce", "0", "--alpha-mlm", "0", "--alpha-cos", "0"),
         ("all 0",)),
        (("--cache", reference_cache, *RESUME, "--layer-map", "5"), ("teacher layer(s) 5", "2 layers")),
        (("--cache", reference_cache, *RESUME, "--alpha-ce", "1"), ("other settings", "alpha_ce: 5.0 -> 1.0")),
        (("--cache", reference_cache, *BASE, "--max-steps", "5", "--save-every", "3"),
         ("has trained 39 steps", "length of 5 steps")),  # a length may grow, never shrink below what is done
        (("--cache", reference_cache, "--temperature", "2", "--batch-size", "8", "--epochs", "2"),
         ("temperature grid", "1, 1.5, 3")),
    ]
    for args, needles in cases:
        assert_refused(invoke("--out", run, *args), *needles)
        assert digest(run) == before, args

    corrupt = copy_cache("corrupt")
    for shard in (corrupt / "shards").glob("*.parquet"):  # whichever the first window holds
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    assert_refused(invoke("--out", run, "--cache", corrupt, *RESUME), "corrupt cache", "SHA-256")
    assert digest(run) == before
    (corrupt / "manifest.json").write_text("{ not json")
    assert_refused(invoke("--out", run, "--cache", corrupt, *RESUME), "manifest.json")
    assert digest(run) == before


def test_a_directory_holding_something_else_is_refused(tmp_path, reference_cache, digest):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    before = digest(other)
    assert_refused(invoke("--out", other, "--cache", reference_cache, *BASE), "not empty", "no kdpipe student run")
    assert digest(other) == before and not (other / ".lock").exists()


def test_a_student_with_another_vocabulary_is_refused_naming_both_sizes(tmp_path, reference_cache):
    cfg = tmp_path / "student.json"
    cfg.write_text(json.dumps({"vocab_size": 200}))
    r = invoke("--out", tmp_path / "run", "--cache", reference_cache, *BASE, "--student-config", cfg)
    vocab = json.loads((reference_cache / "teacher_config.json").read_text())["vocab_size"]
    assert_refused(r, "200", str(vocab))
    assert not (tmp_path / "run").exists()


def test_a_teacher_that_is_not_the_caches_is_refused(tmp_path, reference_cache, other_teacher_dir):
    r = invoke("--out", tmp_path / "run", "--cache", reference_cache, *BASE, "--teacher", other_teacher_dir)
    assert_refused(r, "not the teacher this cache was made from")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def other_cache(tmp_path_factory, teacher_dir, small_corpus_file, kdpipe_cli, dump_args) -> Path:
    out = tmp_path_factory.mktemp("other") / "cache"
    kdpipe_cli("teacher-dump", "--teacher", teacher_dir, "--data", small_corpus_file, "--out", out, *dump_args)
    return out


def test_a_run_or_checkpoint_from_another_cache_is_refused(tmp_path, finished_run, other_cache, digest):
    run = partial_copy(finished_run, tmp_path / "run")
    before = digest(run)
    assert_refused(invoke("--out", run, "--cache", other_cache, *RESUME), "another cache")
    assert digest(run) == before

    # a run on the other cache, handed a checkpoint made from the reference cache
    other_run = tmp_path / "other-run"
    args = ("--out", other_run, "--cache", other_cache, *BASE, "--max-steps", "6", "--save-every", "3")
    assert invoke(*args).exit_code == 0
    shutil.rmtree(other_run / "final")
    ckpts = other_run / "checkpoints"
    shutil.rmtree(ckpts / "step-0000003")
    shutil.copytree(run / "checkpoints" / "step-0000039", ckpts / "step-0000003")
    (ckpts / "latest").write_text("step-0000003\n")
    before = digest(other_run)
    assert_refused(invoke(*args), "trained from another cache")
    assert digest(other_run) == before


def test_a_checkpoint_record_with_a_bad_field_is_refused_in_one_line(tmp_path, finished_run, reference_cache,
                                                                     digest):
    run = partial_copy(finished_run, tmp_path / "run")
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    meta["step"] = "late"
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    before = digest(run)
    assert_refused(invoke("--out", run, "--cache", reference_cache, *RESUME), f"checkpoint {ckpt} is invalid: step:")
    assert digest(run) == before


# --------------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def peaked_cache(tmp_path_factory, teacher_dir, corpus_file, kdpipe_cli, dump_args) -> Path:
    """The tiny teacher with a head scaled up, so its softened distributions carry information."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("peaked") / "teacher"
    model = AutoModelForMaskedLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        model.cls.predictions.transform.LayerNorm.weight.mul_(8.0)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(folder)
    out = folder.parent / "cache"
    kdpipe_cli("teacher-dump", "--teacher", folder, "--data", corpus_file, "--out", out, *dump_args)
    return out


def test_a_few_hundred_steps_reduce_every_loss_term(tmp_path, peaked_cache):
    cfg = StudentConfig(cache=str(peaked_cache), out=str(tmp_path / "run"), init="random", temperature=1.5,
                        max_steps=300, batch_size=16, lr=2e-3, log_every=10, save_every=1000)
    main(cfg)
    lines = metrics(tmp_path / "run")
    first, last = lines[:3], lines[-3:]
    for key in ("loss", "loss_ce", "loss_mlm", "loss_cos"):
        a, b = sum(m[key] for m in first) / 3, sum(m[key] for m in last) / 3
        assert b < 0.8 * a, (key, a, b)


def test_a_narrower_student_learns_its_own_hidden_map_with_accumulation(tmp_path, reference_cache):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    r = invoke("--out", out, "--cache", reference_cache, "--temperature", "3", "--init", "random",
               "--student-hidden", "16", "--student-heads", "2", "--batch-tokens", "96", "--grad-accum", "2",
               "--epochs", "1", "--ce-masked-only", "--keep-checkpoints", "1", "--save-every", "2")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["steps"] == summary["total_steps"] and summary["epoch"] == 1.0
    hmap = load_file(str(out / "final" / "kdpipe_hidden_map.safetensors"))
    assert hmap["weight"].shape == (16, 16)  # (cache width d, student width)
    assert (out / "final" / "tokenizer_config.json").exists()  # from the cache: no teacher needed
    assert len([p for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")]) == 1


# ------------------------------------------------------- checkpoints as models, longer runs, init-from

def test_every_checkpoint_is_a_model_folder(finished_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForMaskedLM, pipeline

    ckpt = finished_run / "checkpoints" / "step-0000039"
    model = AutoModelForMaskedLM.from_pretrained(ckpt)
    assert model.config.num_hidden_layers == 1
    fill = pipeline("fill-mask", model=str(ckpt), top_k=2)
    assert len(fill("the [MASK] film")) == 2
    # the checkpoint at the last step holds the final weights
    last, final = (load_file(str(p / "model.safetensors")) for p in (finished_run / "checkpoints" / "step-0000042",
                                                                      finished_run / "final"))
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in last)


def test_a_finished_run_is_extended_with_the_schedule_of_its_new_length(tmp_path, reference_cache):
    from safetensors.torch import load_file

    from kdpipe.pipeline.schedule import lr_at, warmup_steps

    out = tmp_path / "run"
    args = ("--out", out, "--cache", reference_cache, *BASE, "--save-every", "4", "--log-every", "1")
    assert invoke(*args, "--max-steps", "6").exit_code == 0
    six = load_file(str(out / "final" / "model.safetensors"))
    r = invoke(*args, "--max-steps", "9")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["status"], summary["steps"]) == ("extended", 9)
    lines = metrics(out)
    assert [m["step"] for m in lines] == list(range(1, 10))
    warm = warmup_steps(9, 0.05)
    for m in lines[6:]:  # the new steps follow the schedule of a 9-step run
        assert m["lr"] == pytest.approx(lr_at(m["step"] - 1, 5e-4, 9, warm))
    record = json.loads((out / "run.json").read_text())
    assert record["total_steps"] == 9
    (change,) = record["length_changes"]
    assert (change["at_step"], change["from_total_steps"], change["to_total_steps"]) == (6, 6, 9)
    nine = load_file(str(out / "final" / "model.safetensors"))
    assert any(not torch.equal(six[k], nine[k]) for k in six)
    assert json.loads((out / "final" / "kdpipe_student.json").read_text())["steps"] == 9
    assert not list(out.glob(".final.*"))
    assert json.loads(invoke(*args, "--max-steps", "9").stdout)["status"] == "already complete"
    assert_refused(invoke(*args, "--max-steps", "7"), "has trained 9 steps")


def test_a_student_starts_from_any_model_folder(tmp_path, finished_run, reference_cache):
    from safetensors.torch import load_file

    src = finished_run / "checkpoints" / "step-0000039"
    out = tmp_path / "run"
    r = invoke("--out", out, "--cache", reference_cache, *BASE, "--init-from", src, "--max-steps", "1",
               "--lr", "1e-12", "--alpha-cos", "0")
    assert r.exit_code == 0, r.stderr
    init = json.loads((out / "run.json").read_text())["init"]
    assert init["init"] == "pretrained" and init["init_from"] == str(src)
    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-8) for k in a)  # one step at lr 1e-12: the folder's weights
    assert_refused(invoke("--out", tmp_path / "r2", "--cache", reference_cache, *BASE, "--init-from", src,
                          "--student-layers", "2"), "architecture from its folder", "student_layers")
    assert_refused(invoke("--out", tmp_path / "r3", "--cache", reference_cache, *BASE, "--init-from",
                          tmp_path / "nothing"), "not a model folder")


def test_report_to_tensorboard_logs_every_metric_and_the_gradient_norm(tmp_path, reference_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, plain = tmp_path / "tb", tmp_path / "plain"
    common = ("--cache", reference_cache, *BASE, "--max-steps", "4", "--log-every", "2")
    r = invoke("--out", out, *common, "--report-to", "tensorboard", "--max-grad-norm", "0.5")
    assert r.exit_code == 0, r.stderr
    lines = metrics(out)
    assert all(m["grad_norm"] > 0.5 for m in lines)  # the norm before clipping
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/grad_norm", "train/lr", "train/loss_ce"} <= tags
    assert [e.step for e in acc.Scalars("train/grad_norm")] == [2, 4]
    assert acc.Scalars("train/grad_norm")[1].value == pytest.approx(lines[1]["grad_norm"], rel=1e-6)
    # the default reports to metrics.jsonl only; the gradient norm is there without clipping too
    assert invoke("--out", plain, *common, "--max-grad-norm", "0").exit_code == 0
    assert not (plain / "tensorboard").exists() and all(m["grad_norm"] > 0 for m in metrics(plain))
