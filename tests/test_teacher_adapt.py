"""teacher-adapt: an encoder without a masked-LM head becomes a teacher kdpipe accepts.

A tiny BERT encoder is saved as a plain `BertModel` (no `cls.predictions.*`), as the built-in
MiniLM is; teacher-dump refuses it, teacher-adapt trains a head on a labels-only cache, and the
adapted folder is then accepted, loads without missing weights and beats its random head.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from collections.abc import Callable
from subprocess import CompletedProcess

import pytest
from transformers import BertForMaskedLM, BertModel, BertTokenizerFast

Cli = Callable[..., CompletedProcess]


@pytest.fixture(scope="module")
def encoder_only(teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, hidden-32 encoder folder with a tokenizer and no MLM head."""
    folder = tmp_path_factory.mktemp("encoder")
    BertModel.from_pretrained(teacher_dir).save_pretrained(folder)
    BertTokenizerFast.from_pretrained(teacher_dir).save_pretrained(folder)
    return folder


def test_headless_encoder_is_refused_then_adapted(encoder_only: Path, corpus_file: Path, tmp_path: Path,
                                                  kdpipe_cli: Cli, kdpipe_inproc: Cli) -> None:
    tiny_corpus_path = corpus_file
    refused = kdpipe_inproc("teacher-dump", "--teacher", encoder_only, "--data", tiny_corpus_path,
                            "--out", tmp_path / "c0", "--seq-len", "32")
    assert refused.returncode != 0 and "no trained masked-LM head" in refused.stderr
    assert "teacher-adapt" in refused.stderr

    out = tmp_path / "adapted"
    args = ("teacher-adapt", "--teacher", encoder_only, "--data", tiny_corpus_path, "--out", out,
            "--heldout", tiny_corpus_path, "--heldout-sequences", "32", "--seq-len", "32",
            "--max-steps", "40", "--batch-size", "8", "--warmup-steps", "4", "--lr", "3e-3",
            "--save-every", "20")
    summary = json.loads(kdpipe_cli(*args, timeout=300).stdout)
    model_dir = out / "model"
    assert Path(summary["model"]) == model_dir
    model, info = BertForMaskedLM.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"]  # the head is there now
    assert summary["steps"] == 40
    assert summary["accuracy_after"] > summary["accuracy_before"]
    cache_manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert cache_manifest["targets"] == "none" and cache_manifest["hidden_dim"] == 0
    assert cache_manifest["fingerprint"]["teacher"]["weights_sha256"] is None  # no weights read

    # the adapted folder is a teacher: teacher-dump accepts it
    kdpipe_cli("teacher-dump", "--teacher", model_dir, "--data", tiny_corpus_path, "--out",
               tmp_path / "c1", "--seq-len", "32", "--top-k", "8", "--hidden-dim", "16")

    # rerun: everything is reused, nothing rewritten
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    again = json.loads(kdpipe_cli(*args, timeout=300).stdout)
    assert again["accuracy_after"] == summary["accuracy_after"]
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime


# ------------------------------------------------------------------ OUT is tied to what made it

def encoder_folder(teacher: Path, folder: Path) -> Path:
    BertModel.from_pretrained(teacher).save_pretrained(folder)
    BertTokenizerFast.from_pretrained(teacher).save_pretrained(folder)
    return folder


def quick_args(teacher: Path, data: Path, out: Path, *more: str) -> tuple:
    return ("teacher-adapt", "--teacher", teacher, "--data", data, "--out", out, "--seq-len", "32",
            "--max-sequences", "24", "--max-steps", "3", "--batch-size", "8", "--warmup-steps", "1",
            "--save-every", "3", *more)


def tree(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def adapted(encoder_only: Path, small_corpus_file: Path, tmp_path_factory: pytest.TempPathFactory,
            kdpipe_inproc: Cli) -> Path:
    out = tmp_path_factory.mktemp("adapted") / "out"
    r = kdpipe_inproc(*quick_args(encoder_only, small_corpus_file, out, "--heldout", small_corpus_file,
                                  "--heldout-sequences", "4"))
    assert r.returncode == 0, r.stderr
    return out


def test_a_matching_rerun_changes_nothing(adapted: Path, encoder_only: Path, small_corpus_file: Path,
                                          kdpipe_inproc: Cli) -> None:
    before = tree(adapted)
    stamps = {p: p.stat().st_mtime_ns for p in adapted.rglob("*") if p.is_file() and p.name != ".lock"}
    r = kdpipe_inproc(*quick_args(encoder_only, small_corpus_file, adapted, "--heldout", small_corpus_file,
                                  "--heldout-sequences", "4"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == str(adapted / "model")
    assert tree(adapted) == before
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # not even rewritten


def test_other_settings_or_another_teacher_are_refused(adapted: Path, encoder_only: Path, other_teacher_dir: Path,
                                                       small_corpus_file: Path, tmp_path: Path, kdpipe_inproc: Cli,
                                                       one_line_error) -> None:
    out = Path(shutil.copytree(adapted, tmp_path / "out"))
    before = tree(out)
    one_line_error(kdpipe_inproc(*quick_args(encoder_only, small_corpus_file, out, "--max-steps", "4")),
                   "other settings", "max_steps: 3 -> 4")
    assert tree(out) == before
    # another teacher at the same path, after cache/ and run/ were removed: model/ is not its result
    shutil.rmtree(out / "cache")
    shutil.rmtree(out / "run")
    before = tree(out)
    shutil.rmtree(encoder_only.parent / "swap", ignore_errors=True)
    other = encoder_folder(other_teacher_dir, encoder_only.parent / "swap")
    one_line_error(kdpipe_inproc(*quick_args(other, small_corpus_file, out)), "another teacher", "teacher")
    assert tree(out) == before


def test_a_folder_it_did_not_make_is_refused(encoder_only: Path, small_corpus_file: Path, tmp_path: Path,
                                             teacher_dir: Path, kdpipe_inproc: Cli, one_line_error) -> None:
    out = tmp_path / "out"
    shutil.copytree(teacher_dir, out / "model")  # a user's model
    before = tree(out)
    one_line_error(kdpipe_inproc(*quick_args(encoder_only, small_corpus_file, out)), "did not make", "model")
    assert tree(out) == before


def test_a_model_folder_that_is_not_the_trained_one_is_refused_and_scores_follow_the_heldout(
        adapted: Path, encoder_only: Path, small_corpus_file: Path, corpus_file: Path, tmp_path: Path,
        kdpipe_inproc: Cli, one_line_error) -> None:
    out = Path(shutil.copytree(adapted, tmp_path / "out"))
    # other held-out text: the scores are redone for it, the model is not
    model = tree(out / "model")
    r = kdpipe_inproc(*quick_args(encoder_only, small_corpus_file, out, "--heldout", corpus_file,
                                  "--heldout-sequences", "6"))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "adapt.json").read_text())
    assert report["heldout"] == [str(corpus_file)] and report["heldout_sequences"] == 6
    assert tree(out / "model") == model
    # model/ replaced under the record: refused, left alone
    (out / "model" / "config.json").write_text((out / "model" / "config.json").read_text() + " ")
    before = tree(out)
    one_line_error(kdpipe_inproc(*quick_args(encoder_only, small_corpus_file, out)),
                   "is not the model this run trained")
    assert tree(out) == before
