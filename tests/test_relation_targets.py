"""Relation targets (teacher-dump --relation-layer/--relation-parts, student-train --alpha-relation):
the stored values are the teacher layer's own query/key/value outputs; L_rel equals a float64
reference; resumes are byte-identical; manifest, fingerprint, cache info, card and Parquet metadata
say what is there; a cache without relations is unchanged; the loss trains and resumes bit for
bit, and is refused in one line where the cache, the layers or the heads cannot serve it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from transformers import BertConfig, BertForMaskedLM

from helpers import assert_refused as refused
from helpers import plain_rows, tiny_teacher
from helpers import SMALL_DUMP as DUMP
from helpers import SMALL_TRAIN as TRAIN
from helpers import manifest_of as manifest
from helpers import small_dump as dump
from helpers import student_train as train
from kdpipe.pipeline import values
from kdpipe.pipeline.cache import load_manifest
from kdpipe.pipeline.cli import cli
from kdpipe.pipeline.losses import relation_kl_loss
from kdpipe.pipeline.relation_targets import LayerParts, encoder_layers

RELATION = ("--relation-layer", "3")  # of 4: a 2-layer student copies it into its last layer (map 0, 2)


@pytest.fixture(scope="module")
def relation_cache(tmp_path_factory, kdpipe_inproc, teacher4, small_corpus_file) -> Path:
    out = tmp_path_factory.mktemp("relation") / "cache"
    proc = dump(kdpipe_inproc, teacher4, small_corpus_file, out, *RELATION)
    assert proc.returncode == 0, proc.stderr
    return out


def hooked(model: torch.nn.Module, index: int, ids: torch.Tensor, mask: torch.Tensor | None = None
           ) -> list[torch.Tensor]:
    """Forward hooks on block `index`'s query, key and value Linears: what the attention computes."""
    block = encoder_layers(model)[index]
    linears = [m for n, m in block.named_modules() if n.rsplit(".", 1)[-1] in
               ("query", "key", "value", "q_lin", "k_lin", "v_lin")]
    got: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, args, out: got.append(out.detach())) for m in linears]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    assert len(got) == 3
    return got  # q, k, v: the order both architectures call them in


# ------------------------------------------------------------------------------------ the loss

def reference_relation_kl(student: torch.Tensor, teacher: torch.Tensor, lengths: list[int], parts: int,
                          heads: int) -> torch.Tensor:
    """The loss in float64, row by row over each row's real tokens, head by head, without masks."""
    per_part = []
    for p in range(parts):
        kls = []
        for b, n in enumerate(lengths):
            s = student[b, :n].double().chunk(parts, dim=-1)[p]  # (n, D_s)
            t = teacher[b, :n].double().chunk(parts, dim=-1)[p]  # (n, D_t)
            for xs, xt in zip(s.chunk(heads, dim=-1), t.chunk(heads, dim=-1)):
                log_q = torch.log_softmax(xs @ xs.T / math.sqrt(xs.shape[1]), dim=-1)  # (n, n)
                log_p = torch.log_softmax(xt @ xt.T / math.sqrt(xt.shape[1]), dim=-1)
                kls.append((log_p.exp() * (log_p - log_q)).sum(-1))  # (n,) per query
        per_part.append(torch.cat(kls).mean())
    return torch.stack(per_part).mean()


@pytest.mark.parametrize("parts, heads", [(3, 2), (1, 4)])
def test_relation_kl_matches_a_float64_reference(parts, heads):
    """Teacher 24 wide, student 8 wide per part (the relation heads make them comparable), rows
    padded to 7 tokens: the value and the gradient equal the float64 reference's."""
    g = torch.Generator().manual_seed(0)
    lengths = [7, 3, 5]
    mask = (torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]).long()  # (B, T)
    student = (torch.randn(3, 7, parts * 8, generator=g) * 2).requires_grad_()
    teacher = torch.randn(3, 7, parts * 24, generator=g) * 3
    garbage = (mask == 0)[..., None]  # what padding holds must not matter
    got = relation_kl_loss(student.masked_fill(garbage, 1e3), teacher.masked_fill(garbage, -7.0), mask, parts, heads)
    (grad,) = torch.autograd.grad(got, student)
    ref_in = student.detach().double().requires_grad_()
    want = reference_relation_kl(ref_in, teacher, lengths, parts, heads)
    (ref_grad,) = torch.autograd.grad(want, ref_in)
    assert got.dtype == torch.float32 and want > 0.05
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
    assert relation_kl_loss(teacher, teacher, mask, parts, heads).item() == pytest.approx(0.0, abs=1e-6)


def test_the_layer_parts_are_what_the_attention_computes():
    """LayerParts applied to a block's input (hidden_states[j]) equals the block's own query, key
    and value outputs, caught by forward hooks, for a BERT and a DistilBERT; padding included."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(0)
    models = [BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                         intermediate_size=32)),
              DistilBertForMaskedLM(DistilBertConfig(vocab_size=50, dim=16, n_layers=3, n_heads=2, hidden_dim=32))]
    ids = torch.randint(5, 50, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    for model in models:
        model.eval()
        for j in range(3):
            with torch.no_grad():
                hs = model.base_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
                got = LayerParts(model, j, "qkv")(hs[j])  # (B, T, 3 * 16)
                v_only = LayerParts(model, j, "v")(hs[j])
            want = torch.cat(hooked(model, j, ids, mask), dim=-1)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            torch.testing.assert_close(v_only, want[..., 32:], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ dump side

def test_stored_parts_are_the_teachers_own_projections(relation_cache, teacher4):
    """Read with plain pyarrow, recomputed with the teacher and forward hooks on layer 3's attention."""
    from kdpipe.pipeline.teacher import load_teacher

    model = load_teacher(str(teacher4))
    table = pq.read_table(relation_cache / manifest(relation_cache)["shards"][0]["path"])
    for row in plain_rows(table)[:3]:
        ids = torch.tensor([row["input_ids"]])
        want = torch.cat(hooked(model, 2, ids), dim=-1)[0].numpy()  # (T, 96): layer 3 is block 2
        stored = row["relation"].astype(np.float32)
        assert stored.shape == (len(row["input_ids"]), 96)
        np.testing.assert_allclose(stored, want, atol=2e-3 * max(1, np.abs(want).max()))


def test_the_cache_says_what_it_holds(relation_cache, kdpipe_inproc):
    m = manifest(relation_cache)
    assert m["fingerprint"]["relation"] == {"layer": 3, "parts": "qkv"}
    rel = m["relation"]
    assert (rel["layer"], rel["parts"], rel["dim"], rel["heads"], rel["raw_bytes_per_token"]) == (3, "qkv", 32, 2, 192)
    assert rel["raw_bytes_per_token_by_parts"]["v"] == 64 and rel["raw_bytes_per_token_by_parts"]["qk"] == 128
    info = json.loads(kdpipe_inproc("cache", "info", relation_cache).stdout)
    kinds = info["bytes_per_token_by_kind"]
    assert info["relation"] == rel
    assert set(kinds) == {"inputs", "hidden", "relation", "relation_per_part", "targets"}
    assert kinds["relation"] == m["bytes_per_token_by_column"]["relation"] > kinds["hidden"] > 0
    assert kinds["relation_per_part"] == pytest.approx(kinds["relation"] / 3, abs=1e-3)
    by_column = sum(m["bytes_per_token_by_column"].values())
    assert sum(v for k, v in kinds.items() if k != "relation_per_part") == pytest.approx(by_column, abs=0.01)
    schema = pq.read_schema(relation_cache / m["shards"][0]["path"])
    field = schema.field("relation")
    assert field.metadata[b"kdpipe.width"] == b"96" and field.metadata[b"kdpipe.dtype"] == b"<f2"
    assert field.metadata[b"kdpipe.layer"] == b"3" and field.metadata[b"kdpipe.parts"] == b"qkv"
    desc = json.loads(schema.metadata[b"kdpipe.description"])
    assert desc["relation"]["layer"] == 3 and desc["relation"]["parts"] == "qkv"
    card = (relation_cache / "README.md").read_text()
    assert "| relation |" in card and "teacher layer 3: q, k, v, 32 entries each" in card
    assert kdpipe_inproc("cache", "verify", "--deep", relation_cache).returncode == 0


def test_a_cache_without_relations_is_as_it_was(reference_cache, kdpipe_inproc):
    m = manifest(reference_cache)
    assert m["relation"] is None and "relation" not in m["fingerprint"]
    assert "relation" not in pq.read_schema(reference_cache / m["shards"][0]["path"]).names
    info = json.loads(kdpipe_inproc("cache", "info", reference_cache).stdout)
    assert info["relation"] is None and "relation" not in info["bytes_per_token_by_kind"]


@pytest.mark.parametrize("extra", [(), ("--targets", "sampled", "--samples", "8", "--temperatures", "2",
                                        "--relation-parts", "v", "--target-positions", "masked")])
def test_resume_is_byte_identical(tmp_path, kdpipe_inproc, digest, teacher4, small_corpus_file, extra):
    out = tmp_path / "cache"
    proc = dump(kdpipe_inproc, teacher4, small_corpus_file, out, *RELATION, *extra)
    assert proc.returncode == 0, proc.stderr
    m = load_manifest(out)
    assert m.relation.parts == ("v" if extra else "qkv") and m.relation.width == (32 if extra else 96)
    before = digest(out)
    for e in m.shards[1::2]:
        (out / e.path).unlink()
    (out / "manifest.json").unlink()
    proc = kdpipe_inproc("teacher-dump", "--teacher", teacher4, "--data", small_corpus_file, "--out", out, *DUMP,
                         *RELATION, *extra, "--writers", "2")
    assert proc.returncode == 0, proc.stderr
    after = digest(out)
    for d in (before, after):
        d.pop("manifest.json"), d.pop("run_info.json")
    assert after == before


def test_other_relation_settings_are_refused_on_the_same_cache(tmp_path, relation_cache, kdpipe_inproc,
                                                               one_line_error, digest, teacher4, small_corpus_file):
    cache = Path(shutil.copytree(relation_cache, tmp_path / "cache"))
    before = digest(cache)
    for extra in (("--relation-layer", "3", "--relation-parts", "v"), ()):
        one_line_error(dump(kdpipe_inproc, teacher4, small_corpus_file, cache, *extra), "other settings", "relation")
    assert digest(cache) == before


@pytest.mark.parametrize("extra, needle", [
    (("--relation-layer", "0"), "relation_layer"), (("--relation-layer", "5"), "the teacher has 4 layers"),
    (("--relation-layer", "4", "--relation-parts", "x"), "'x'"),
    (("--relation-parts", "v"), "needs --relation-layer"),
    (("--relation-layer", "4", "--targets", "none"), "stores no relation targets")])
def test_unusable_relation_settings_are_one_line(tmp_path, kdpipe_inproc, one_line_error, teacher4,
                                                 small_corpus_file, extra, needle):
    out = tmp_path / "cache"
    proc = dump(kdpipe_inproc, teacher4, small_corpus_file, out, *extra)
    if needle == "'x'":  # click refuses a choice before kdpipe sees it: one usage error, no traceback
        assert proc.returncode != 0 and "'x'" in proc.stderr and "Traceback" not in proc.stderr
    else:
        one_line_error(proc, needle)
    assert not out.exists()


def test_a_value_projection_beyond_float16_is_refused_where_made(tmp_path, kdpipe_inproc, one_line_error,
                                                                 small_corpus_file):
    """Layer 2's values scaled past float16 (its LayerNorm keeps the hidden states sane): the dump
    stops before the shard is written, naming the column."""
    teacher = tiny_teacher(tmp_path / "loud", layers=2)
    model = BertForMaskedLM.from_pretrained(teacher)
    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.value.weight.mul_(1e7)
    model.save_pretrained(teacher)
    out = tmp_path / "cache"
    one_line_error(dump(kdpipe_inproc, teacher, small_corpus_file, out, "--relation-layer", "2"),
                   "not written", "relation holds")
    assert not list((out / "shards").glob("*.parquet"))


def test_a_non_finite_relation_is_refused_where_used(tmp_path, relation_cache, teacher4):
    """Re-hashed so its bytes verify: the values check names the column; cache verify --deep reports
    it; student-train refuses the cache in one line."""
    import tamper
    from kdpipe.pipeline.shards import from_table, read_fingerprint, to_table

    cache = Path(shutil.copytree(relation_cache, tmp_path / "cache"))
    m = load_manifest(cache)
    path = cache / m.shards[0].path
    table = pq.read_table(path)
    data = from_table(table)
    data.relation = data.relation.copy()  # decoded arrays are read-only views
    data.relation[4, 50] = -np.inf
    with pytest.raises(values.ValueProblem, match="relation holds -inf"):
        values.check(data, values.limits_of(m), m.shards[0].first_seq, m.shards[0].num_seqs)
    tamper._write(path, to_table(data, table.schema), read_fingerprint(path))
    tamper._rehash(cache, manifest(cache))
    r = CliRunner().invoke(cli, ["cache", "verify", "--deep", str(cache)])
    assert r.exit_code != 0 and "relation holds -inf" in r.stderr
    out = tmp_path / "run"
    refused(train("--out", out, "--cache", cache, "--teacher", teacher4, *TRAIN, "--shuffle-window", "99",
                  "--alpha-relation", "1"), "relation holds -inf")


# ---------------------------------------------------------------------------------- train side

@pytest.mark.parametrize("shape", [(), ("--student-hidden", "16", "--init", "random", "--relation-heads", "4")])
def test_relation_loss_trains_and_resumes_bit_for_bit(tmp_path, relation_cache, teacher4, shape):
    """A 2-layer student of the 4-layer teacher, as wide (its last layer copied from teacher layer 3)
    or half as wide (random, 4 relation heads: 8 and 4 dims each)."""
    args = ("--cache", relation_cache, "--teacher", teacher4, *TRAIN, *shape, "--alpha-relation", "3")
    whole = tmp_path / "whole"
    r = train("--out", whole, *args)
    assert r.exit_code == 0, r.stderr
    lines = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    assert all(x["loss_relation"] > 0 for x in lines)
    identity = json.loads((whole / "run.json").read_text())["identity"]
    assert identity["alpha_relation"] == 3 and identity["relation_heads"] == (4 if shape else 2)
    if shape:  # a random student starts far from the teacher's relations and moves towards them
        assert lines[-1]["loss_relation"] < lines[0]["loss_relation"]

    cut = Path(shutil.copytree(whole, tmp_path / "cut"))  # as if killed after the checkpoint at step 3
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-0000006")
    (cut / "checkpoints" / "latest").write_text("step-0000003\n")
    r = train("--out", cut, *args)
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "resumed", r.stderr
    for f in ("model.safetensors", "kdpipe_hidden_map.safetensors"):
        assert (cut / "final" / f).read_bytes() == (whole / "final" / f).read_bytes(), f
    resumed = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["loss"], x["loss_relation"]) for x in resumed] == \
        [(x["step"], x["loss"], x["loss_relation"]) for x in lines]


def test_without_the_relation_loss_nothing_new_is_recorded(tmp_path, relation_cache, teacher4):
    out = tmp_path / "run"
    r = train("--out", out, "--cache", relation_cache, "--teacher", teacher4, *TRAIN)
    assert r.exit_code == 0, r.stderr
    identity = json.loads((out / "run.json").read_text())["identity"]
    assert "alpha_relation" not in identity and "relation_heads" not in identity  # older runs resume
    assert "loss_relation" not in json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


@pytest.mark.parametrize("cache, extra, needles", [
    ("reference", ("--student-layers", "1", "--init", "random"), ("holds none", "--relation-layer")),
    ("relation", ("--relation-heads", "3"), ("--relation-heads 3", "width 32 is not divisible")),
    ("relation", ("--student-hidden", "24", "--student-heads", "2", "--init", "random", "--relation-heads", "16"),
     ("the student's projection width 24",)),
    ("relation", ("--layer-map", "0,1"), ("teacher layer 3", "--layer-map holding 2")),
])
def test_a_relation_loss_the_cache_or_student_cannot_serve_is_refused_in_one_line(
        tmp_path, relation_cache, reference_cache, teacher4, cache, extra, needles):
    src = relation_cache if cache == "relation" else reference_cache
    teacher = ("--teacher", teacher4) if cache == "relation" else ()
    out = tmp_path / "run"
    refused(train("--out", out, "--cache", src, *teacher, *TRAIN, "--alpha-relation", "1", *extra), *needles)
    assert not out.exists()


def test_relation_heads_without_the_loss_are_refused(tmp_path, relation_cache, teacher4):
    out = tmp_path / "run"
    refused(train("--out", out, "--cache", relation_cache, "--teacher", teacher4, *TRAIN, "--relation-heads", "2"),
            "relation_heads goes with alpha_relation")
    assert not out.exists()
