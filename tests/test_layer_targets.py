"""Layer-wise targets (teacher-dump --hidden-layers, student-train --alpha-layer-cos): what is stored
is the teacher's states through each layer's own projection, in every mode that stores `hidden`;
resumes are byte-identical; the manifest, fingerprint, cache info, card and Parquet metadata say
what is there; the student's loss trains, resumes bit for bit, and is refused in one line where
the cache lacks its layers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from helpers import assert_refused as refused
from helpers import plain_rows
from helpers import SMALL_DUMP as DUMP
from helpers import SMALL_TRAIN as TRAIN
from helpers import manifest_of as manifest
from helpers import small_dump as dump
from helpers import student_train as train
from kdpipe.pipeline import values
from kdpipe.pipeline.cache import load_manifest
from kdpipe.pipeline.cli import cli
from kdpipe.pipeline.loader import read_shard

LAYERS = ("--hidden-layers", "2,0")  # given unsorted: stored sorted, 0 (embeddings) and 2 of 4


@pytest.fixture(scope="module")
def layers_cache(tmp_path_factory, kdpipe_inproc, teacher4, small_corpus_file) -> Path:
    out = tmp_path_factory.mktemp("layers") / "cache"
    proc = dump(kdpipe_inproc, teacher4, small_corpus_file, out, *LAYERS)
    assert proc.returncode == 0, proc.stderr
    return out


# ------------------------------------------------------------------------------------ dump side

def test_each_layer_is_the_teachers_state_through_its_own_projection(layers_cache, teacher_model, teacher4):
    """Recomputed with the teacher here: hidden_states[l] @ layers[i] for each stored layer, and
    the last layer's hidden column unchanged; pca fits each layer on its own states."""
    from kdpipe.pipeline.teacher import load_teacher

    model = load_teacher(str(teacher4))
    p = load_file(str(layers_cache / "projection.safetensors"))
    assert p["layers"].shape == (2, 32, 8) and p["projection"].shape == (32, 8)
    eye = torch.eye(8)
    for m in (p["projection"], *p["layers"]):  # orthonormal columns, and three different matrices
        assert torch.allclose(m.T @ m, eye, atol=1e-5)
    assert not torch.allclose(p["layers"][0], p["layers"][1]) and not torch.allclose(p["layers"][1], p["projection"])
    table = pq.read_table(layers_cache / manifest(layers_cache)["shards"][0]["path"])  # plain pyarrow
    for row in plain_rows(table)[:3]:
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        stored = row["hidden_layers"].astype(np.float32).reshape(len(row["input_ids"]), 2, 8)
        for i, layer in enumerate((0, 2)):
            want = (hs[layer][0] @ p["layers"][i]).numpy()
            np.testing.assert_allclose(stored[:, i], want, atol=2e-3 * max(1, np.abs(want).max()))
        last = (hs[-1][0] @ p["projection"]).numpy()
        np.testing.assert_allclose(row["hidden"].astype(np.float32), last, atol=2e-3 * max(1, np.abs(last).max()))


def test_the_cache_says_what_it_holds(layers_cache, kdpipe_inproc):
    m = manifest(layers_cache)
    assert m["hidden_layers"] == [0, 2] and m["fingerprint"]["hidden"]["layers"] == [0, 2]
    info = json.loads(kdpipe_inproc("cache", "info", layers_cache).stdout)
    kinds = info["bytes_per_token_by_kind"]
    assert info["hidden_layers"] == [0, 2]
    assert set(kinds) == {"inputs", "hidden", "hidden_layers", "hidden_per_layer", "targets"}
    assert kinds["hidden_layers"] == m["bytes_per_token_by_column"]["hidden_layers"] > kinds["hidden"] > 0
    assert kinds["hidden_per_layer"] == pytest.approx(kinds["hidden_layers"] / 2, abs=1e-3)
    by_column = sum(m["bytes_per_token_by_column"].values())  # the kinds split the columns (not the footers)
    assert sum(v for k, v in kinds.items() if k != "hidden_per_layer") == pytest.approx(by_column, abs=0.01)
    schema = pq.read_schema(layers_cache / m["shards"][0]["path"])
    field = schema.field("hidden_layers")
    assert field.metadata[b"kdpipe.width"] == b"16" and field.metadata[b"kdpipe.dtype"] == b"<f2"
    assert json.loads(field.metadata[b"kdpipe.layers"]) == [0, 2] and field.metadata[b"kdpipe.projection"] == b"pca"
    desc = json.loads(schema.metadata[b"kdpipe.description"])
    assert desc["hidden_layers"]["layers"] == [0, 2] and desc["hidden_layers"]["dim"] == 8
    card = (layers_cache / "README.md").read_text()
    assert "| hidden_layers |" in card and "0, 2 (0: embeddings)" in card
    assert kdpipe_inproc("cache", "verify", "--deep", layers_cache).returncode == 0


def test_a_cache_without_layers_is_as_it_was(reference_cache):
    m = manifest(reference_cache)
    assert m["hidden_layers"] == [] and "layers" not in m["fingerprint"]["hidden"]
    assert "hidden_layers" not in pq.read_schema(reference_cache / m["shards"][0]["path"]).names
    assert set(load_file(str(reference_cache / "projection.safetensors"))) == {"projection"}


@pytest.mark.parametrize("extra", [(), ("--targets", "sampled", "--samples", "8", "--temperatures", "2"),
                                   ("--targets", "exact", "--hidden-dim", "32"), ("--hidden-proj", "random", "--target-positions", "masked")])
def test_resume_is_byte_identical_in_every_mode(tmp_path, kdpipe_inproc, digest, teacher4, small_corpus_file, extra):
    out = tmp_path / "cache"
    proc = dump(kdpipe_inproc, teacher4, small_corpus_file, out, *LAYERS, *extra)
    assert proc.returncode == 0, proc.stderr
    m = load_manifest(out)
    assert m.hidden_layers == [0, 2]
    if "exact" in extra or "random" in extra:  # one matrix for every layer: identity, or the seeded one
        p = load_file(str(out / "projection.safetensors"))
        assert all(torch.equal(x, p["projection"]) for x in p["layers"])
    before = digest(out)
    for e in m.shards[1::2]:
        (out / e.path).unlink()
    (out / "manifest.json").unlink()
    proc = kdpipe_inproc("teacher-dump", "--teacher", teacher4, "--data", small_corpus_file, "--out", out, *DUMP,
                         *LAYERS, *extra, "--writers", "2")
    assert proc.returncode == 0, proc.stderr
    after = digest(out)
    for d in (before, after):
        d.pop("manifest.json"), d.pop("run_info.json")
    assert after == before


def test_other_layers_are_refused_on_the_same_cache(tmp_path, layers_cache, kdpipe_inproc, one_line_error, digest,
                                                    teacher4, small_corpus_file):
    cache = Path(shutil.copytree(layers_cache, tmp_path / "cache"))
    before = digest(cache)
    proc = dump(kdpipe_inproc, teacher4, small_corpus_file, cache, "--hidden-layers", "1")
    one_line_error(proc, "other settings", "hidden.layers")
    assert digest(cache) == before


@pytest.mark.parametrize("layers, extra, needle", [
    ("4", (), "last layer"), ("7", (), "the teacher has 4 layers"), ("-1", (), "0 (the embeddings"),
    ("1,1", (), "distinct"), ("1", ("--targets", "none"), "stores no hidden states")])
def test_unusable_hidden_layers_are_one_line(tmp_path, kdpipe_inproc, one_line_error, teacher4, small_corpus_file,
                                             layers, extra, needle):
    out = tmp_path / "cache"
    one_line_error(dump(kdpipe_inproc, teacher4, small_corpus_file, out, "--hidden-layers", layers, *extra), needle)
    assert not out.exists()


def test_a_non_finite_layer_state_is_refused_where_made_and_where_used(tmp_path, layers_cache, teacher4):
    """Re-hashed so its bytes verify: the values check (the dump's and the loader's) names the
    column; student-train refuses the cache in one line, cache verify --deep reports it."""
    import tamper
    from kdpipe.pipeline.shards import from_table, read_fingerprint, to_table

    cache = Path(shutil.copytree(layers_cache, tmp_path / "cache"))
    m = load_manifest(cache)
    path = cache / m.shards[0].path
    table = pq.read_table(path)
    data = from_table(table)
    assert data.hidden_layers.shape == (data.tokens, 16)
    data.hidden_layers = data.hidden_layers.copy()  # decoded arrays are read-only views
    data.hidden_layers[5, 9] = np.inf
    with pytest.raises(values.ValueProblem, match="hidden_layers holds inf"):
        values.check(data, values.limits_of(m), m.shards[0].first_seq, m.shards[0].num_seqs)
    tamper._write(path, to_table(data, table.schema), read_fingerprint(path))
    tamper._rehash(cache, manifest(cache))
    r = CliRunner().invoke(cli, ["cache", "verify", "--deep", str(cache)])
    assert r.exit_code != 0 and "hidden_layers holds inf" in r.stderr
    out = tmp_path / "run"
    refused(train("--out", out, "--cache", cache, "--teacher", teacher4, *TRAIN, "--shuffle-window", "99"),
            "hidden_layers holds inf")


# ---------------------------------------------------------------------------------- train side

@pytest.mark.parametrize("width", ["32", "16"])  # the layers' own projections, or learned maps
def test_layer_loss_trains_and_resumes_bit_for_bit(tmp_path, layers_cache, teacher4, width):
    """A 2-layer student of the 4-layer teacher matches its output 1 to the teacher's layer 2."""
    shape = () if width == "32" else ("--student-hidden", width, "--init", "random")
    args = ("--cache", layers_cache, "--teacher", teacher4, *TRAIN, *shape, "--alpha-layer-cos", "2")
    whole = tmp_path / "whole"
    r = train("--out", whole, *args)
    assert r.exit_code == 0, r.stderr
    lines = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert all(x["loss_layer_cos"] > 0 for x in lines)
    assert json.loads((whole / "run.json").read_text())["identity"]["alpha_layer_cos"] == 2
    maps = load_file(str(whole / "final" / "kdpipe_hidden_map.safetensors"))
    assert set(maps) == ({"last.matrix", "layers.0.matrix"} if width == "32" else {"last.weight", "layers.0.weight"})
    if width == "32":  # the teacher-wide student maps through the stored projection of layer 2
        assert torch.equal(maps["layers.0.matrix"], load_file(str(layers_cache / "projection.safetensors"))["layers"][1])

    cut = Path(shutil.copytree(whole, tmp_path / "cut"))  # as if killed after the checkpoint at step 3
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-0000006")
    (cut / "checkpoints" / "latest").write_text("step-0000003\n")
    r = train("--out", cut, *args)
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "resumed", r.stderr
    for f in ("model.safetensors", "kdpipe_hidden_map.safetensors"):
        assert (cut / "final" / f).read_bytes() == (whole / "final" / f).read_bytes(), f


def test_without_the_layer_loss_nothing_new_is_recorded(tmp_path, layers_cache, teacher4):
    out = tmp_path / "run"
    r = train("--out", out, "--cache", layers_cache, "--teacher", teacher4, *TRAIN)
    assert r.exit_code == 0, r.stderr
    assert "alpha_layer_cos" not in json.loads((out / "run.json").read_text())["identity"]  # older runs resume
    assert "loss_layer_cos" not in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert set(load_file(str(out / "final" / "kdpipe_hidden_map.safetensors"))) == {"matrix"}


@pytest.mark.parametrize("cache, extra, needles", [
    ("layers", ("--student-layers", "3"), ("after layer(s) 1, 2", "holds 0, 2", "--hidden-layers 1,2")),
    ("layers", ("--student-layers", "3", "--layer-map", "0,2,3"), ("after layer(s) 2, 3",)),
    ("layers", ("--student-layers", "1"), ("no layer below its last",)),
    ("reference", ("--student-layers", "2", "--init", "random"), ("after layer(s) 1", "holds none"))])
def test_a_cache_without_the_matched_layers_is_refused_in_one_line(tmp_path, layers_cache, reference_cache,
                                                                   teacher4, cache, extra, needles):
    src = layers_cache if cache == "layers" else reference_cache
    teacher = ("--teacher", teacher4) if cache == "layers" else ()
    out = tmp_path / "run"
    refused(train("--out", out, "--cache", src, *teacher, *TRAIN, "--alpha-layer-cos", "1", *extra), *needles)
    assert not out.exists()
