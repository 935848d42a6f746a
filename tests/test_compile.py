"""--torch-compile (Hugging Face's TrainingArguments names) in teacher-dump, student-train, eval and
teacher-adapt, through torch.compile's real code path with the aot_eager backend (dynamo traces,
AOTAutograd builds forward and backward graphs, no code generation: seconds). Inductor itself took
26 s to compile the tiny teacher's forward from a cold cache here, too slow for the suite; its
values are checked by bench/compile.py. Checkpoints keep the plain module's tensor names, a
compiled run resumes exactly, and wherever results are recorded a compile is recorded with them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors import safe_open

from helpers import plain_rows
from kdpipe.schemas.checkpoint import STUDENT_FILE

TRAIN = ("--temperature", "1.5", "--batch-size", "8", "--seed", "0", "--log-every", "1", "--max-steps", "4",
         "--save-every", "2")
AOT = ("--torch-compile-backend", "aot_eager")
TIMING = ("tokens_per_s", "steps_per_s", "data_wait_pct")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts with no compiled code cached (its limit of recompiles is per process)."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def graphs() -> int:
    """Graphs dynamo has compiled in this process so far (the CLI runs in-process here)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_bad_backends_and_modes_are_refused_in_one_line_by_every_stage(
        tmp_path, reference_cache, teacher_dir, small_corpus_file, kdpipe_inproc, one_line_error):
    stages = {
        "student-train": ("--cache", reference_cache, "--out", tmp_path / "run"),
        "teacher-dump": ("--teacher", teacher_dir, "--data", small_corpus_file, "--out", tmp_path / "cache"),
        "eval": ("--teacher", teacher_dir, "--student", teacher_dir, "--out", tmp_path / "report"),
        "teacher-adapt": ("--teacher", teacher_dir, "--data", small_corpus_file, "--out", tmp_path / "adapt"),
    }
    for stage, args in stages.items():
        one_line_error(kdpipe_inproc(stage, *args, "--torch-compile-backend", "nope"),
                       "unknown backend 'nope'", "inductor")
        one_line_error(kdpipe_inproc(stage, *args, "--torch-compile-mode", "fastest"),
                       "unknown mode 'fastest'", "max-autotune")
        one_line_error(kdpipe_inproc(stage, *args, "--torch-compile-backend", "eager", "--torch-compile-mode",
                                     "max-autotune"), "mode of the inductor backend")
    assert not any(tmp_path.iterdir())  # refused before anything was made


def test_a_backend_or_a_mode_turns_compiling_on_as_in_transformers(reference_cache):
    from kdpipe.stages.student_train import StudentConfig

    base = {"cache": str(reference_cache), "out": "x"}
    assert StudentConfig(**base).compile_spec() is None
    assert StudentConfig(**base, torch_compile_backend="eager").compile_spec().backend == "eager"
    spec = StudentConfig(**base, torch_compile_mode="max-autotune").compile_spec()
    assert (spec.backend, spec.mode) == ("inductor", "max-autotune")
    assert StudentConfig(**base, torch_compile=True).compile_record() == {
        "torch_compile": {"backend": "inductor", "mode": None}}


def test_a_compiled_student_saves_plain_names_and_resumes_exactly(tmp_path, reference_cache, kdpipe_inproc,
                                                                  one_line_error):
    from transformers import AutoModelForMaskedLM

    plain, run = tmp_path / "plain", tmp_path / "compiled"
    compiled_graphs = {}
    for out, extra in ((plain, ()), (run, AOT)):
        before = graphs()
        r = kdpipe_inproc("student-train", "--cache", reference_cache, "--out", out, *TRAIN, *extra)
        assert r.returncode == 0, r.stderr
        compiled_graphs[out.name] = graphs() - before
    assert compiled_graphs["plain"] == 0 and compiled_graphs["compiled"] > 0
    record = json.loads((run / "run.json").read_text())
    assert record["identity"]["torch_compile"] == {"backend": "aot_eager", "mode": None}
    assert "torch_compile" not in json.loads((plain / "run.json").read_text())["identity"]
    for folder in (run / "checkpoints" / "step-0000002", run / "final"):
        with safe_open(str(folder / STUDENT_FILE), "pt") as f:
            keys = set(f.keys())
        with safe_open(str(plain / "final" / STUDENT_FILE), "pt") as f:
            assert keys == set(f.keys()) and not any("_orig_mod" in k for k in keys)
        AutoModelForMaskedLM.from_pretrained(folder)  # loads without kdpipe
    # the same computation, traced: each step's losses as the eager run's
    for a, b in zip(metrics(run), metrics(plain), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)

    cut = Path(shutil.copytree(run, tmp_path / "cut"))  # as if killed after the checkpoint at step 2
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-0000004")
    (cut / "checkpoints" / "latest").write_text("step-0000002\n")
    r = kdpipe_inproc("student-train", "--cache", reference_cache, "--out", cut, *TRAIN, *AOT)
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "resumed", r.stderr
    assert (cut / "final" / STUDENT_FILE).read_bytes() == (run / "final" / STUDENT_FILE).read_bytes()
    assert metrics(cut) == metrics(run)
    # compiling may change float results: a resume repeats it
    one_line_error(kdpipe_inproc("student-train", "--cache", reference_cache, "--out", run, *TRAIN,
                                 "--max-steps", "6"), "other settings", "torch_compile")


def _dump(kdpipe_inproc, out: Path, teacher_dir, corpus_file, dump_args, *extra: str) -> dict:
    r = kdpipe_inproc("teacher-dump", "--teacher", teacher_dir, "--data", corpus_file, "--out", out, *dump_args,
                      "--max-sequences", "8", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads((out / "manifest.json").read_text())


def _targets(cache: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = plain_rows(pq.read_table(cache / "shards"))
    return tuple(np.concatenate([r[c] for r in rows]).astype(np.float32) for c in ("topk_ids", "topk_logits"))


def test_a_compiled_dump_records_it_and_stores_the_same_targets(tmp_path, teacher_dir, corpus_file,
                                                                kdpipe_inproc, dump_args, one_line_error):
    plain = _dump(kdpipe_inproc, tmp_path / "plain", teacher_dir, corpus_file, dump_args)
    before = graphs()
    comp = _dump(kdpipe_inproc, tmp_path / "compiled", teacher_dir, corpus_file, dump_args,
                 "--torch-compile-backend", "aot_eager")
    assert graphs() > before
    assert "torch_compile" not in plain["fingerprint"]["teacher"]  # the default adds nothing
    assert comp["fingerprint"]["teacher"]["torch_compile"] == {"backend": "aot_eager", "mode": None}
    assert comp["fingerprint_sha256"] != plain["fingerprint_sha256"]
    (ids_a, z_a), (ids_b, z_b) = _targets(tmp_path / "plain"), _targets(tmp_path / "compiled")
    assert np.array_equal(ids_a, ids_b)
    assert np.abs(z_a - z_b).max() <= 1e-3  # float16 storage: at most a rounding step apart
    # a cache is resumed only as it was begun
    one_line_error(kdpipe_inproc("teacher-dump", "--teacher", teacher_dir, "--data", corpus_file, "--out",
                                 tmp_path / "compiled", *dump_args, "--max-sequences", "8"),
                   "other settings", "torch_compile")


def test_a_compiled_eval_records_it_and_scores_as_the_eager_one(tmp_path, teacher_dir, small_corpus_file,
                                                                kdpipe_inproc):
    args = ("--teacher", teacher_dir, "--student", f"s={teacher_dir}", "--heldout", small_corpus_file,
            "--seq-len", "32", "--heldout-sequences", "8", "--speed-repeats", "1", "--speed-warmup", "0",
            "--speed-batch-size", "2", "--speed-seq-len", "16")
    for name, extra in (("plain", ()), ("compiled", AOT)):
        before = graphs()
        r = kdpipe_inproc("eval", *args, "--out", tmp_path / name, *extra)
        assert r.returncode == 0, r.stderr
        assert (graphs() > before) == bool(extra)
    settings = {n: json.loads((tmp_path / n / "eval.json").read_text())["settings"] for n in ("plain", "compiled")}
    assert settings["compiled"]["torch_compile"] == {"backend": "aot_eager", "mode": None}
    assert "torch_compile" not in settings["plain"]
    mlm = {n: json.loads((tmp_path / n / "parts" / "mlm" / "s.json").read_text())["data"]
           for n in ("plain", "compiled")}
    assert mlm["compiled"]["top1_accuracy"] == mlm["plain"]["top1_accuracy"]
    assert mlm["compiled"]["mean_cross_entropy"] == pytest.approx(mlm["plain"]["mean_cross_entropy"], rel=1e-5)
    speed = json.loads((tmp_path / "compiled" / "parts" / "speed.json").read_text())["data"]
    assert len(speed["latency_ms"]["s"]) == 1  # timed once, after a warm-up that compiled it
