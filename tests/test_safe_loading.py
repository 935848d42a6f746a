"""Pickles and damaged files where tensors are expected: one `Error:` line naming the file, never
torch's advice to rerun with weights_only=False, never the pickle's code run, nothing on disk changed.

Each bad file is re-hashed where kdpipe records a hash (checkpoint.json, the manifest), so the
refusal comes from the loading itself, not from a hash check in front of it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from kdpipe.pipeline.fsutil import sha256_file
from kdpipe.schemas.checkpoint import OPTIMIZER_FILE, STUDENT_FILE

RUN = ("--temperature", "1.5", "--batch-size", "8", "--seed", "0", "--max-steps", "6",
       "--save-every", "3", "--log-every", "3")


class Payload:
    """Unpickling this runs a shell command that leaves a file behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_pickle(path: Path, marker: Path, extra: dict | None = None) -> None:
    torch.save({**(extra or {}), "payload": Payload(marker)}, path)


def no_unsafe_advice(proc) -> None:
    assert "weights_only" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, reference_cache, kdpipe_cli) -> Path:
    """A run with checkpoints and no final/ (as if killed after its step-6 checkpoint)."""
    out = tmp_path_factory.mktemp("pickle-run") / "run"
    kdpipe_cli("student-train", "--cache", reference_cache, "--out", out, *RUN)
    shutil.rmtree(out / "final")
    return out


@pytest.mark.parametrize("name", [OPTIMIZER_FILE, STUDENT_FILE])
def test_a_pickled_checkpoint_file_is_one_line_naming_it(tmp_path, killed_run, reference_cache, kdpipe_inproc,
                                                         one_line_error, digest, name):
    run = Path(shutil.copytree(killed_run, tmp_path / "run"))
    ckpt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    marker = tmp_path / "pwned"
    write_pickle(ckpt / name, marker)
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    assert name in meta["files"]
    meta["files"][name] = sha256_file(ckpt / name)  # the hash check passes; the loading must refuse
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    before = digest(run)
    proc = kdpipe_inproc("student-train", "--cache", reference_cache, "--out", run, *RUN)
    one_line_error(proc, str(ckpt / name))
    no_unsafe_advice(proc)
    assert not marker.exists()
    assert digest(run) == before


def test_a_pickled_teacher_is_one_line_naming_its_weights_file(tmp_path, teacher_dir, corpus_file, kdpipe_inproc,
                                                               one_line_error, dump_args):
    teacher = Path(shutil.copytree(teacher_dir, tmp_path / "teacher"))
    from safetensors.torch import load_file

    state = load_file(str(teacher / "model.safetensors"))
    (teacher / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    write_pickle(teacher / "pytorch_model.bin", marker, state)
    proc = kdpipe_inproc("teacher-dump", "--teacher", teacher, "--data", corpus_file, "--out", tmp_path / "c",
                         *dump_args)
    one_line_error(proc, str(teacher / "pytorch_model.bin"), "pickle", "posix.system")
    no_unsafe_advice(proc)
    assert not marker.exists() and not (tmp_path / "c").exists()


def test_a_pickled_student_folder_in_eval_is_one_line(tmp_path, teacher_dir, kdpipe_inproc, one_line_error):
    student = Path(shutil.copytree(teacher_dir, tmp_path / "student"))
    (student / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    write_pickle(student / "pytorch_model.bin", marker)
    proc = kdpipe_inproc("eval", "--teacher", teacher_dir, "--student", student, "--out", tmp_path / "r",
                         "--no-speed", "--heldout", teacher_dir / "vocab.txt")
    one_line_error(proc, str(student / "pytorch_model.bin"))
    no_unsafe_advice(proc)
    assert not marker.exists()


@pytest.mark.parametrize("what", ["pickle", "truncated"])
def test_a_bad_projection_rehashed_into_the_manifest_is_one_line(tmp_path, copy_cache, kdpipe_inproc,
                                                                 one_line_error, what):
    cache = copy_cache()
    proj = cache / "projection.safetensors"
    marker = tmp_path / "pwned"
    if what == "pickle":
        write_pickle(proj, marker)
    else:
        proj.write_bytes(proj.read_bytes()[:40])
    manifest = json.loads((cache / "manifest.json").read_text())
    entry = manifest["projection"]
    entry["sha256"] = sha256_file(proj)
    if "bytes" in entry:
        entry["bytes"] = proj.stat().st_size
    (cache / "manifest.json").write_text(json.dumps(manifest))
    proc = kdpipe_inproc("student-train", "--cache", cache, "--out", tmp_path / "run", *RUN)
    one_line_error(proc, str(proj.resolve()))
    no_unsafe_advice(proc)
    assert not marker.exists() and not (tmp_path / "run").exists()
