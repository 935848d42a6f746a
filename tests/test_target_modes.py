"""Target modes beyond top-k, end to end on real dumps of a tiny teacher: the exact cache gives back
the teacher's logits and the full KL; sampled draws are a pure function of (seed, sequence, view,
position) and their loss is unbiased; masked-position caches are smaller and line up with the MLM
positions; each mode refuses what only another serves; mode and position set survive kill -9;
`cache verify` and `cache fidelity` work on every mode; a student trains from each."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from helpers import plain_rows
from kdpipe.pipeline.cache import verify_cache
from kdpipe.pipeline.loader import DataPosition, LoaderSpec, iter_batches
from kdpipe.pipeline.losses import LossSpec, ce_term, exact_kl_from_state, sampled_ce
from kdpipe.pipeline.targets import position_uniforms, sample_counts
from kdpipe.pipeline.teacher import TeacherRunner, load_teacher
from kdpipe.schemas.manifest import Manifest

# seq-len 16 and 5 sequences a shard: the small corpus gives ~48 sequences in ~10 shards
SMALL = ("--seq-len", "16", "--shard-size", "5", "--batch-size", "4")
MODES = {
    "topk": ("--targets", "topk", "--top-k", "4", "--temperatures", "1,2", "--hidden-dim", "8"),
    "topk-masked": ("--targets", "topk", "--top-k", "4", "--temperatures", "1,2", "--hidden-dim", "8",
                    "--target-positions", "masked"),
    "sampled": ("--targets", "sampled", "--samples", "16", "--temperatures", "2", "--hidden-dim", "8"),
    "sampled-masked": ("--targets", "sampled", "--samples", "16", "--temperatures", "2", "--hidden-dim", "8",
                       "--target-positions", "masked"),
    "exact": ("--targets", "exact"),
    "none": ("--targets", "none"),
}
TIMESTAMPS = ("created_at", "finished_at")


def manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def rows_of(cache: Path) -> list[dict]:
    return [r for e in manifest(cache)["shards"] for r in plain_rows(pq.read_table(cache / e["path"]))]


def without_timestamps(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in TIMESTAMPS}


def report(request: pytest.FixtureRequest, **values: float) -> None:
    """Measured values: in the junit properties, and printed (pytest -s, or -rP)."""
    for k, v in values.items():
        request.node.user_properties.append((k, v))
    print(f"{request.node.name}: " + ", ".join(f"{k}={v:.3g}" for k, v in values.items()))


@pytest.fixture(scope="module")
def peaked(tmp_path_factory, teacher_dir: Path) -> Path:
    """The tiny teacher with its head's LayerNorm scaled up: softened distributions that carry
    information (the plain tiny teacher's are near uniform)."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("peaked") / "teacher"
    model = AutoModelForMaskedLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        model.cls.predictions.transform.LayerNorm.weight.mul_(8.0)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def peaked_model(peaked: Path) -> torch.nn.Module:
    return load_teacher(str(peaked))


@pytest.fixture(scope="module")
def caches(tmp_path_factory, peaked: Path, small_corpus_file: Path, kdpipe_inproc) -> dict[str, Path]:
    """One complete cache per mode (read-only for the tests: copy before changing anything)."""
    root = tmp_path_factory.mktemp("modes")
    out = {}
    for name, args in MODES.items():
        out[name] = root / name
        proc = kdpipe_inproc("teacher-dump", "--teacher", peaked, "--data", small_corpus_file,
                             "--out", out[name], *SMALL, *args)
        assert proc.returncode == 0, proc.stderr
    return out


def model_logits(model: torch.nn.Module, input_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([input_ids])).logits[0].float()  # (T, V)


def head_of(cache: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    t = load_file(str(cache / "head.safetensors"))
    return t["weight"], t.get("bias")


# ---------------------------------------------------------------------------------- exact mode

def test_exact_cache_gives_back_the_teachers_logits_within_fp16_rounding(request, caches, peaked_model):
    """logits = teacher_state @ W.T + b from the cache alone, against the model's own logits: to
    float32 rounding from a float32 state, and within the fp16 rounding bound from the stored one."""
    cache = caches["exact"]
    weight, bias = head_of(cache)  # (V, H'), (V,)
    runner = TeacherRunner(peaked_model, 1, (1.0,), torch.eye(peaked_model.config.hidden_size),
                           torch.device("cpu"), mode="exact")
    worst = {"fp32_max_abs": 0.0, "fp16_max_abs": 0.0, "fp16_over_bound": 0.0, "fp32_kl": 0.0, "fp16_kl": 0.0}
    rows = rows_of(cache)
    for row in rows:
        ref = model_logits(peaked_model, row["input_ids"])  # (T, V)
        ids = torch.tensor([row["input_ids"]])
        _, x32 = runner.hidden_and_decoder_input(ids, torch.ones_like(ids))  # (T, H') float32
        x16 = torch.tensor(row["teacher_state"], dtype=torch.float16).float()  # (T, H') as stored
        assert x16.shape == x32.shape and torch.equal(x16, x32.half().float())
        log_ref = F.log_softmax(ref.double(), -1)
        for name, x in (("fp32", x32), ("fp16", x16)):
            z = torch.addmm(bias, x, weight.t())  # (T, V)
            worst[f"{name}_max_abs"] = max(worst[f"{name}_max_abs"], (z - ref).abs().max().item())
            kl = (log_ref.exp() * (log_ref - F.log_softmax(z.double(), -1))).sum(-1).max().item()
            worst[f"{name}_kl"] = max(worst[f"{name}_kl"], kl)
        # fp16 keeps 11 significant bits: |x16 - x| <= 2^-11 |x|, so |dz| <= 2^-11 |x| @ |W|.T
        bound = (x32.abs() * 2.0 ** -11) @ weight.abs().t() + 1e-4 * (1 + ref.abs())
        z16 = torch.addmm(bias, x16, weight.t())
        worst["fp16_over_bound"] = max(worst["fp16_over_bound"], ((z16 - ref).abs() / bound).max().item())
    report(request, **worst)
    assert worst["fp32_max_abs"] < 1e-4
    assert worst["fp16_over_bound"] <= 1.0
    assert worst["fp32_kl"] < 1e-9 and worst["fp16_kl"] < 1e-5


@pytest.mark.parametrize("t", [1.0, 2.0, 3.7])
def test_exact_l_ce_is_the_float64_full_logit_kl(caches, t, monkeypatch):
    """exact_kl_from_state on a loader batch (chunked, any temperature) equals KL(p_T || q_T)
    computed in float64 from the full logits the cached state and head give."""
    import kdpipe.pipeline.losses as losses

    cache = caches["exact"]
    m = Manifest.model_validate(manifest(cache))
    head = head_of(cache)
    batch = next(iter_batches(cache, m, LoaderSpec(seed=0, batch_size=6), DataPosition(0, 0), epochs=1))
    p = batch.teacher_state.shape[0]
    assert p == batch.tokens  # targets at every non-padding position
    student = torch.randn(p, m.vocab_size, generator=torch.Generator().manual_seed(1)) * 3
    zt = batch.teacher_state.double() @ head[0].double().t() + head[1].double()  # (P, V)
    log_p, log_q = F.log_softmax(zt / t, -1), F.log_softmax(student.double() / t, -1)
    ref = (log_p.exp() * (log_p - log_q)).sum(-1)  # (P,)
    got = exact_kl_from_state(student, batch.teacher_state, head, t)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-7)
    monkeypatch.setattr(losses, "EXACT_CHUNK_ROWS", 7)  # chunk boundaries change nothing
    assert torch.allclose(exact_kl_from_state(student, batch.teacher_state, head, t), got, atol=1e-7)
    spec = LossSpec(temperature=t, targets="exact")
    assert torch.allclose(ce_term(student, batch, None, spec, head), got, atol=1e-7)


# ------------------------------------------------------------------------------- sampled mode

def test_draws_are_a_pure_function_of_seed_sequence_view_and_position():
    u = position_uniforms(7, 3, 1, 20, 16)  # (positions, draws)
    assert np.array_equal(u[:5], position_uniforms(7, 3, 1, 5, 16)), "a row does not depend on the row count"
    assert np.array_equal(u, position_uniforms(7, 3, 1, 20, 16))
    for other in ((8, 3, 1), (7, 4, 1), (7, 3, 0)):
        assert not np.array_equal(u, position_uniforms(*other, 20, 16)), other
    # draws of a row depend on its logits and uniforms only: any chunk, order or subset of rows
    z = torch.randn(20, 50, generator=torch.Generator().manual_seed(0)) * 2
    ut = torch.from_numpy(u)
    ids, counts = sample_counts(z, 2.0, ut)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    ids_p, counts_p = sample_counts(z[perm], 2.0, ut[perm])
    assert torch.equal(ids_p, ids[perm]) and torch.equal(counts_p, counts[perm])
    ids_1, counts_1 = sample_counts(z[4:5], 2.0, ut[4:5])
    assert torch.equal(ids_1[0], ids[4]) and torch.equal(counts_1[0], counts[4])
    assert (counts.sum(-1) == 16).all()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(2, 40), st.integers(1, 64), st.integers(0, 2**31 - 1))
def test_draw_counts_are_the_run_lengths_of_the_sorted_draws(rows, vocab, draws, seed):
    """Each distinct draw's count sits at its first occurrence and equals how often it was drawn
    (checked against a plain per-row count); repeats count 0; every row's counts sum to N."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g) * 3
    ids, counts = sample_counts(z, 2.0, torch.rand(rows, draws, generator=g, dtype=torch.float64))
    for r in range(rows):
        values, freq = torch.unique(ids[r], return_counts=True)
        assert torch.equal(ids[r][counts[r] > 0], values) and torch.equal(counts[r][counts[r] > 0], freq)
        assert int(counts[r].sum()) == draws


def test_sampled_caches_draw_the_same_at_masked_positions_whatever_the_batch(
        tmp_path, caches, peaked, small_corpus_file, kdpipe_inproc):
    """A sequence dumped with positions all and masked, or with another batch size, gets the same
    draws at its masked positions; every position holds N draws."""
    one = tmp_path / "batch-1"
    proc = kdpipe_inproc("teacher-dump", "--teacher", peaked, "--data", small_corpus_file, "--out", one,
                         *SMALL, *MODES["sampled"], "--batch-size", "1")
    assert proc.returncode == 0, proc.stderr
    full, masked, batch1 = rows_of(caches["sampled"]), rows_of(caches["sampled-masked"]), rows_of(one)
    assert len(full) == len(masked) == len(batch1) > 30
    n_pos = 0
    for a, b, c in zip(full, masked, batch1):
        assert (a["seq_id"], a["view"], a["input_ids"]) == (b["seq_id"], b["view"], b["input_ids"])
        assert (a["sample_ids"], a["sample_counts"]) == (c["sample_ids"], c["sample_counts"])
        assert len(a["sample_ids"]) == a["length"] and len(b["sample_ids"]) == len(b["mlm_positions"])
        for j, pos in enumerate(b["mlm_positions"]):
            assert b["sample_ids"][j] == a["sample_ids"][pos] and b["sample_counts"][j] == a["sample_counts"][pos]
            n_pos += 1
        for ids, counts in zip(a["sample_ids"], a["sample_counts"]):
            assert sum(counts) == 16 and ids == sorted(set(ids)) and min(counts) > 0
    assert n_pos > 50


def test_sampled_loss_is_unbiased_over_seeds(request, caches, peaked_model):
    """The mean over dump seeds of the sampled L_ce (draws made as the dump makes them) converges
    to the full cross-entropy H(p_T, q_T); its counts c/N to p. Tolerances from the standard error."""
    rows = rows_of(caches["exact"])[:4]
    z = torch.cat([model_logits(peaked_model, r["input_ids"]) for r in rows])  # (P, V) teacher
    g = torch.Generator().manual_seed(5)
    s = z + torch.randn(z.shape, generator=g) * 2  # a student near the teacher
    t, n, seeds = 2.0, 16, 300
    p = torch.softmax(z.double() / t, -1)
    log_q = F.log_softmax(s.double() / t, -1)
    full = -(p * log_q).sum(-1)  # (P,) H(p_T, q_T)
    var = ((p * log_q ** 2).sum(-1) - full ** 2) / n  # (P,) variance of one position's estimate
    lengths = [r["length"] for r in rows]
    estimates, freq = [], torch.zeros_like(p)
    for seed in range(seeds):
        u = np.concatenate([position_uniforms(seed, i, 0, ln, n) for i, ln in enumerate(lengths)])
        ids, counts = sample_counts(z, t, torch.from_numpy(u))
        assert (counts.sum(-1) == n).all()
        estimates.append(sampled_ce(s, ids, counts, t).double().mean().item())
        freq.scatter_add_(1, ids, counts.double() / n)
    est = torch.tensor(estimates)
    se_one = math.sqrt(var.sum().item()) / len(full)  # standard error of one seed's mean
    se = se_one / math.sqrt(seeds)
    bias = est.mean().item() - full.mean().item()
    report(request, positions=len(full), seeds=seeds, bias=bias, standard_error=se,
           empirical_sd=est.std().item(), predicted_sd=se_one)
    assert abs(bias) < 4 * se
    assert 0.8 < est.std().item() / se_one < 1.25, "the standard error matches the spread"
    freq /= seeds
    sd = (p * (1 - p) / (n * seeds)).sqrt()
    assert ((freq - p).abs() <= 6 * sd + 1e-4).all(), "the counts estimate p"


# ----------------------------------------------------------------------------- masked positions

def test_a_masked_cache_is_smaller_and_lines_up_with_mlm_positions(caches):
    full, masked = caches["topk"], caches["topk-masked"]
    mf, mm = manifest(full), manifest(masked)
    assert mm["target_positions"] == "masked" and mf["target_positions"] == "all"
    assert mm["bytes"] < mf["bytes"]
    for col in ("topk_ids", "topk_logits", "log_z"):
        assert mm["bytes_per_token_by_column"][col] < 0.5 * mf["bytes_per_token_by_column"][col], col
    for a, b in zip(rows_of(full), rows_of(masked)):
        assert (a["input_ids"], a["mlm_positions"], a["mlm_labels"]) == \
            (b["input_ids"], b["mlm_positions"], b["mlm_labels"])
        assert len(b["topk_ids"]) == len(b["mlm_positions"]) and len(b["hidden"]) == b["length"]
        for col in ("topk_ids", "topk_logits"):
            assert np.array_equal(b[col], a[col][b["mlm_positions"]]), col
        # log Z sums exp over the vocabulary in float32: the summation order may vary with the
        # number of rows reduced together, so the last bit may differ
        assert np.allclose(b["log_z"], a["log_z"][b["mlm_positions"]], rtol=4e-7, atol=0)
    # and through the loader: the masked cache's target rows are the all cache's at mlm_index
    spec = LoaderSpec(seed=3, batch_size=7)
    for ba, bm in zip(iter_batches(full, Manifest.model_validate(mf), spec, DataPosition(0, 0), 1),
                      iter_batches(masked, Manifest.model_validate(mm), spec, DataPosition(0, 0), 1)):
        assert np.array_equal(ba.seq_id, bm.seq_id) and torch.equal(ba.mlm_index, bm.mlm_index)
        assert bm.topk_ids.shape[0] == bm.mlm_index.numel() and ba.topk_ids.shape[0] == ba.tokens
        for name in ("topk_ids", "topk_logits"):
            assert torch.equal(getattr(ba, name)[ba.mlm_index], getattr(bm, name)), name
        assert torch.allclose(ba.log_z[ba.mlm_index], bm.log_z, rtol=4e-7, atol=0)


# ---------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("cache, args, needles", [
    ("topk", ("--temperature", "3"), ("--temperature 3 is not in the cache's temperature grid (1, 2)",
                                      "exact cache serves any temperature")),
    ("sampled", ("--temperature", "1"), ("drawn at T = 2", "fixed at dump time")),
    ("topk-masked", ("--temperature", "2"), ("masked positions only", "--ce-masked-only")),
    ("sampled-masked", ("--temperature", "2"), ("masked positions only", "--ce-masked-only")),
    ("none", ("--alpha-cos", "0"), ("holds no teacher targets", "alpha_ce to 0")),
    ("none", ("--alpha-ce", "0"), ("no teacher hidden states", "alpha_cos to 0")),
])
def test_student_train_refuses_what_only_another_mode_serves(tmp_path, caches, cache, args, needles,
                                                             kdpipe_inproc, one_line_error):
    out = tmp_path / "run"
    proc = kdpipe_inproc("student-train", "--cache", caches[cache], "--out", out, "--init", "random",
                         "--max-steps", "2", *args)
    one_line_error(proc, *needles)
    assert not out.exists()


@pytest.mark.parametrize("args, needles", [
    (("--targets", "sampled", "--temperatures", "1,2"), ("drawn at one temperature", "--temperatures 2")),
    (("--targets", "exact", "--hidden-proj", "pca"), ("exact targets keep the teacher's hidden state",
                                                      "hidden_proj identity")),
    (("--targets", "exact", "--hidden-proj", "random", "--hidden-dim", "8"), ("hidden_proj identity",)),
])
def test_teacher_dump_refuses_settings_a_mode_cannot_hold(tmp_path, peaked, small_corpus_file, args, needles,
                                                          kdpipe_inproc, one_line_error):
    out = tmp_path / "cache"
    proc = kdpipe_inproc("teacher-dump", "--teacher", peaked, "--data", small_corpus_file, "--out", out,
                         *SMALL, *args)
    one_line_error(proc, *needles)
    assert not out.exists()


# ---------------------------------------------------------------------- resume and verification

def test_kill_9_mid_dump_of_a_sampled_and_an_exact_cache_then_rerun_is_byte_identical(
        tmp_path, caches, peaked, small_corpus_file, kdpipe_popen, kdpipe_inproc, one_line_error, digest):
    """Both dumps run side by side as real processes and are killed once a shard is written. The
    mode and the position set are part of what a rerun resumes: another one is refused on the
    half-made cache, the same one finishes it byte-identical to the uninterrupted module cache."""
    modes = {"sampled-masked": (("--target-positions", "all"), "targets.positions: masked -> all"),
             "exact": (("--targets", "topk", "--hidden-dim", "8"), "targets.mode: exact -> topk")}
    args = {m: ("--teacher", peaked, "--data", small_corpus_file, *SMALL, *MODES[m], "--out", tmp_path / m)
            for m in modes}
    procs = {m: kdpipe_popen("teacher-dump", *args[m]) for m in modes}
    deadline = time.monotonic() + 90
    try:
        running = dict(procs)
        while running:  # each is killed as soon as its first shard is in place
            for m, proc in list(running.items()):
                if list((tmp_path / m / "shards").glob("shard-*.parquet")):
                    os.kill(proc.pid, signal.SIGKILL)
                    del running[m]
                else:
                    assert proc.poll() is None, f"the {m} dump ended before it could be killed"
            assert time.monotonic() < deadline, "no shard appeared in 90 s"
            time.sleep(0.002)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
    for m, (other, what) in modes.items():
        out, ref = tmp_path / m, caches[m]
        assert procs[m].returncode == -signal.SIGKILL and not (out / "manifest.json").exists()
        assert 1 <= len(list((out / "shards").glob("shard-*.parquet"))) < len(manifest(ref)["shards"])

        before = digest(out)
        one_line_error(kdpipe_inproc("teacher-dump", *args[m], *other), "other settings", what)
        assert digest(out) == before

        rerun = kdpipe_inproc("teacher-dump", *args[m])
        assert rerun.returncode == 0 and json.loads(rerun.stdout)["status"] == "resumed", rerun.stderr
        got, want = digest(out), digest(ref)
        for d in (got, want):
            d.pop("run_info.json")  # records --out
            d.pop("manifest.json")
        assert got == want, m
        assert without_timestamps(manifest(out)) == without_timestamps(manifest(ref))
        assert (manifest(out)["targets"], manifest(out)["target_positions"]) == \
            {"sampled-masked": ("sampled", "masked"), "exact": ("exact", "all")}[m]
        assert verify_cache(out)[1] == []


@pytest.mark.parametrize("mode", list(MODES))
def test_cache_info_and_verify_in_every_mode(tmp_path, caches, mode, kdpipe_inproc, one_line_error):
    cache = Path(shutil.copytree(caches[mode], tmp_path / "cache"))
    ok = kdpipe_inproc("cache", "verify", cache)
    assert ok.returncode == 0 and "ok:" in ok.stdout, ok.stderr
    info = json.loads(kdpipe_inproc("cache", "info", cache).stdout)
    m = manifest(cache)
    assert (info["targets"], info["target_positions"], info["samples"], info["state_dim"]) == \
        (m["targets"], m["target_positions"], m["samples"], m["state_dim"])
    victims = [cache / manifest(cache)["shards"][1]["path"]]
    if mode == "exact":
        victims.append(cache / "head.safetensors")
    for victim in victims:
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
        proc = kdpipe_inproc("cache", "verify", cache)
        one_line_error(proc, "1 problem")
        assert f"CORRUPT {victim.relative_to(cache).as_posix()}: SHA-256" in proc.stderr
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))


# ---------------------------------------------------------------------------------- training

@pytest.mark.parametrize("mode, temperature, extra", [
    ("topk", 2.0, ()),
    ("topk-masked", 1.0, ("--ce-masked-only",)),
    ("sampled", 2.0, ()),
    ("sampled-masked", 2.0, ("--ce-masked-only",)),
    ("exact", 3.3, ()),  # not in any grid: the exact cache serves any temperature
])
def test_student_train_from_each_mode_lowers_its_l_ce(tmp_path, caches, mode, temperature, extra, kdpipe_inproc,
                                                     peaked_model):
    """L_ce falls by a fifth in 36 steps (6 epochs) from a random student. The sampled mode's L_ce
    is T^2 times a cross-entropy, T^2 (H(p_T) + KL): its fall is measured above the teacher's
    entropy, the floor no student goes below."""
    out = tmp_path / "run"
    proc = kdpipe_inproc("student-train", "--cache", caches[mode], "--out", out, "--init", "random",
                         "--temperature", str(temperature), "--alpha-mlm", "0", "--alpha-cos", "0",
                         "--max-steps", "36", "--batch-size", "8", "--lr", "3e-3", "--log-every", "1",
                         "--save-every", "1000", "--prefetch", "0", *extra)
    assert proc.returncode == 0, proc.stderr
    ce = [json.loads(x)["loss_ce"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(ce) == 36 and all(math.isfinite(v) for v in ce)
    floor = 0.0
    if mode.startswith("sampled"):  # mean T^2 H(p_T) over the target positions
        ent = []
        for row in rows_of(caches[mode]):
            log_p = F.log_softmax(model_logits(peaked_model, row["input_ids"]).double() / temperature, -1)
            h = -(log_p.exp() * log_p).sum(-1)  # (T,)
            ent.append(h[row["mlm_positions"]] if mode.endswith("masked") else h)
        floor = torch.cat(ent).mean().item() * temperature ** 2
    first, last = sum(ce[:6]) / 6 - floor, sum(ce[-6:]) / 6 - floor  # one epoch each
    # (a student that fits the fixed draws c/N can end below H(p): the floor is not a bound on it)
    assert last < 0.8 * first, (first, last, floor)
    assert (out / "final" / "config.json").is_file()


def test_student_train_from_a_labels_only_cache_lowers_its_l_mlm(tmp_path, caches, kdpipe_inproc):
    out = tmp_path / "run"
    proc = kdpipe_inproc("student-train", "--cache", caches["none"], "--out", out, "--init", "random",
                         "--alpha-ce", "0", "--alpha-cos", "0", "--max-steps", "36", "--batch-size", "8",
                         "--lr", "3e-3", "--log-every", "1", "--save-every", "1000", "--prefetch", "0")
    assert proc.returncode == 0, proc.stderr
    mlm = [json.loads(x)["loss_mlm"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(mlm[-6:]) < 0.9 * sum(mlm[:6])


def test_exact_mode_tracks_online_distillation_step_by_step(tmp_path, caches, peaked, peaked_model):
    """The same student trained from the exact cache and online (the teacher run at every step on
    the same batches, float32 targets): the loss curves agree to fp16 rounding of the stored
    teacher states, step by step, all three terms. The online run really ran the teacher: its
    losses are not bit-equal to the cache's."""
    from kdpipe.pipeline.online import online_targets
    from kdpipe.stages import student_train

    curves = {}
    for name, hook in (("exact", None), ("online", online_targets(peaked_model, torch.device("cpu"), "all"))):
        cfg = student_train.StudentConfig(
            cache=str(caches["exact"]), out=str(tmp_path / name), teacher=str(peaked), student_layers=1,
            temperature=2.0, max_steps=12, batch_size=8, lr=3e-3, log_every=1, save_every=1000,
            prefetch=0, device="cpu")
        student_train.main(cfg, online=hook)
        curves[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert len(curves["exact"]) == len(curves["online"]) == 12
    worst = 0.0
    for a, b in zip(curves["exact"], curves["online"]):
        for key in ("loss", "loss_ce", "loss_mlm", "loss_cos"):
            worst = max(worst, abs(a[key] - b[key]) / abs(b[key]))
    assert 0 < worst < 5e-3, worst
    loss = [r["loss"] for r in curves["online"]]
    assert sum(loss[-3:]) < 0.95 * sum(loss[:3])  # and it trains


# ---------------------------------------------------------------------------- cache fidelity

def test_cache_fidelity_compares_every_mode_with_the_exact_kl(tmp_path, caches, peaked, peaked_model,
                                                             other_teacher_dir, kdpipe_inproc):
    """A student far from the teacher (another tiny model): exact is exact, top-k + tail a lower
    bound that closes at k = V, sampled unbiased with noisier gradients; bytes grow with k and N."""
    vocab = peaked_model.config.vocab_size
    out = tmp_path / "fidelity.json"
    proc = kdpipe_inproc("cache", "fidelity", caches["topk"], "--teacher", peaked, "--positions", "200",
                         "--student", other_teacher_dir, "--k", f"2,4,{vocab}", "--samples", "4,256",
                         "--temperatures", "1,2", "--out", out)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["positions"] >= 200 and r["student"] == str(other_teacher_dir.resolve())
    assert r["cache_check"] == {"mode": "topk", "k": 4, "ids_equal": 1.0, "logits_max_abs_diff": 0.0}
    res = {(x["mode"], x["setting"], x["temperature"]): x for x in r["results"]}
    assert set(res) == {(m, s, t) for m, ss in (("topk", (2, 4, vocab)), ("sampled", (4, 256)), ("exact", (0,)))
                        for s in ss for t in (1.0, 2.0)}
    assert proc.stdout.count("\n| ") == len(res)  # the markdown table: a line each under the header
    for t in (1.0, 2.0):
        exact = res[("exact", 0, t)]
        assert exact["loss_ce_exact"] > 0.05
        assert abs(exact["loss_rel_error"]) < 1e-3 and exact["grad_cosine"] > 0.9999
        errs = [res[("topk", k, t)]["loss_rel_error"] for k in (2, 4, vocab)]
        assert errs[0] < errs[1] < 0 and abs(errs[2]) < 1e-3, "top-k + tail is a lower bound, exact at k = V"
        assert res[("topk", vocab, t)]["grad_cosine"] > 0.9999
        many = res[("sampled", 256, t)]
        assert abs(many["loss_rel_error"]) < 4 * many["loss_rel_error_se"] + 1e-3, "unbiased"
        assert many["grad_norm_ratio"] > 1 and many["grad_cosine"] > res[("sampled", 4, t)]["grad_cosine"]
    b = {k: v["bytes_per_token"] for k, v in res.items()}
    assert b[("topk", 2, 1.0)] < b[("topk", 4, 1.0)] < b[("topk", vocab, 1.0)]
    assert b[("sampled", 4, 1.0)] < b[("sampled", 256, 1.0)]
    stored = manifest(caches["topk"])["bytes_per_token_by_column"]  # the real dump's k = 4 columns
    real = stored["topk_ids"] + stored["topk_logits"] + stored["log_z"]
    assert 0.5 * real < b[("topk", 4, 1.0)] < 2 * real


def test_cache_fidelity_draws_as_the_dump_draws(tmp_path, caches, peaked, kdpipe_inproc):
    for cache, check in (("sampled", {"mode": "sampled", "samples": 16, "temperature": 2.0, "draws_equal": True}),
                         ("sampled-masked", {"mode": "sampled", "samples": 16, "temperature": 2.0,
                                             "draws_equal": True})):
        out = tmp_path / f"{cache}.json"
        proc = kdpipe_inproc("cache", "fidelity", caches[cache], "--teacher", peaked, "--positions", "60",
                             "--k", "4", "--samples", "16", "--temperatures", "2", "--out", out)
        assert proc.returncode == 0, proc.stderr
        r = json.loads(out.read_text())
        assert r["student"].startswith("DistilBERT init: teacher layers 0 ")
        assert r["cache_check"] == check and r["target_positions"] == manifest(caches[cache])["target_positions"]
    proc = kdpipe_inproc("cache", "fidelity", caches["exact"], "--teacher", peaked, "--positions", "30",
                         "--k", "4", "--samples", "8", "--temperatures", "2", "--out", tmp_path / "exact.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "exact.json").read_text())["cache_check"]["state_max_abs_diff"] == 0.0


def test_cache_fidelity_refuses_another_teacher_and_bad_settings(tmp_path, caches, other_teacher_dir, peaked,
                                                                 kdpipe_inproc, one_line_error):
    one_line_error(kdpipe_inproc("cache", "fidelity", caches["topk"], "--teacher", other_teacher_dir, "--k", "4"),
                   "not the teacher this cache was made from")
    one_line_error(kdpipe_inproc("cache", "fidelity", caches["topk"], "--teacher", peaked, "--k", "100000"),
                   "--k values must lie in 1..")
