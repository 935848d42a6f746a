"""What used to pass without a word: a nan or inf setting, a student deeper than its teacher
initialised from it, real-valued task labels, task rows skipped for want of a text or label."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

TRAIN = ("--temperature", "1.5", "--batch-size", "8", "--seed", "0", "--max-steps", "1")


@pytest.mark.parametrize("temps", ["nan", "1,inf", "-inf"])
def test_non_finite_temperatures_are_refused(tmp_path, teacher_dir, small_corpus_file, kdpipe_inproc, one_line_error,
                                             temps):
    out = tmp_path / "cache"
    one_line_error(kdpipe_inproc("teacher-dump", "--teacher", teacher_dir, "--data", small_corpus_file, "--out", out,
                                 "--temperatures", temps), "temperatures", "finite")
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--lr", "--alpha-ce", "--max-grad-norm"])
def test_non_finite_training_settings_are_refused(tmp_path, reference_cache, kdpipe_inproc, one_line_error, flag):
    out = tmp_path / "run"
    one_line_error(kdpipe_inproc("student-train", "--cache", reference_cache, "--out", out, *TRAIN, flag, "inf"),
                   flag.removeprefix("--").replace("-", "_"), "finite")
    assert not out.exists()


def test_a_student_deeper_than_its_teacher_is_refused_unless_asked_for(tmp_path, reference_cache, kdpipe_inproc,
                                                                       one_line_error):
    one_line_error(kdpipe_inproc("student-train", "--cache", reference_cache, "--out", tmp_path / "a", *TRAIN,
                                 "--student-layers", "3"), "3 layers, more than the teacher's 2", "--layer-map")
    assert not (tmp_path / "a").exists()
    for extra in (("--layer-map", "0,1,1"), ("--init", "random")):  # on purpose: trained as asked
        r = kdpipe_inproc("student-train", "--cache", reference_cache, "--out", tmp_path / extra[0].strip("-"),
                          *TRAIN, "--student-layers", "3", *extra)
        assert r.returncode == 0, r.stderr


def write_task(path: Path, labels: list, empty: int = 0) -> Path:
    rnd = random.Random(0)
    with open(path, "w") as f:
        for i in range(24):
            f.write(json.dumps({"text": " ".join(rnd.choice(["the", "a", "cat", "sat", "dog"]) for _ in range(6)),
                                "label": labels[i % len(labels)]}) + "\n")
        for _ in range(empty):
            f.write(json.dumps({"text": "  ", "label": labels[0]}) + "\n")
    return path


def eval_args(teacher_dir: Path, task: Path, out: Path) -> tuple:
    return ("eval", "--teacher", teacher_dir, "--student", f"s={teacher_dir}", "--task", task, "--out", out,
            "--no-speed", "--seeds", "1", "--epochs", "1", "--batch-size", "8", "--seq-len", "32")


def test_real_valued_task_labels_are_refused(tmp_path, teacher_dir, kdpipe_inproc, one_line_error):
    task = write_task(tmp_path / "scores.jsonl", [0.25, -1.5, 3.0, 0.75])
    out = tmp_path / "r"
    one_line_error(kdpipe_inproc(*eval_args(teacher_dir, task, out)), "real numbers", "e.g. -1.5", "map the scores")
    assert not out.exists()


def test_integer_labels_written_as_floats_are_classes_and_skipped_rows_are_noted(tmp_path, teacher_dir,
                                                                                 kdpipe_inproc):
    task = write_task(tmp_path / "classes.jsonl", [0.0, 1.0], empty=3)
    r = kdpipe_inproc(*eval_args(teacher_dir, task, tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    assert "note: task classes: 3 of 27 rows have no text or no label and are skipped" in r.stderr
