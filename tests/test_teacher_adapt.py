"""teacher-adapt: an encoder without a masked-LM head becomes a teacher kdpipe accepts.

A tiny BERT encoder is saved as a plain `BertModel` (no `cls.predictions.*`), as the built-in
MiniLM is; teacher-dump refuses it, teacher-adapt trains a head on a labels-only cache, and the
adapted folder is then accepted, loads without missing weights and beats its random head.
"""

from __future__ import annotations

import json
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
            "--heldout", tiny_corpus_path, "--heldout-sequences", "8", "--seq-len", "32",
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
