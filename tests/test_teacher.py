"""The teacher's reduction: top-k and log-partition at every temperature equal a float64
reference computed from the full logits, and the stored softened top-k distribution is exact."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kdpipe.pipeline.errors import KdpipeError
from kdpipe.pipeline.teacher import (
    TeacherRunner, decoder_bypassed, load_teacher, reduce_logits, tokenizer_sha256, topk, weights_sha256,
)

GRIDS = [(1.0,), (1.0, 2.0, 4.0), (1.0, 1.5, 3.0), (0.5, 1.0, 2.0, 4.0), (2.0, 3.0, 7.0), (0.7, 1.3)]


def reference(z: torch.Tensor, k: int, temps: tuple[float, ...]):
    """float64: top-k of the logits and log sum exp(z / T) over the full vocabulary."""
    z64 = z.double()
    vals, ids = torch.topk(z64, k, dim=-1)
    log_z = torch.stack([torch.logsumexp(z64 / t, dim=-1) for t in temps], dim=-1)
    return ids, vals, log_z


def logits(rows: int, vocab: int, spread: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g) * spread
    z[:, :3] += 4 * spread  # a few clear winners, as a trained head gives
    return z


@pytest.mark.parametrize("temps", GRIDS)
@pytest.mark.parametrize("spread", [1.0, 4.0, 10.0])
def test_reduce_logits_matches_float64(temps: tuple[float, ...], spread: float) -> None:
    z = logits(48, 3000, spread, seed=int(spread * 10) + len(temps))
    ids, vals, log_z = reduce_logits(z.clone(), 16, temps)
    r_ids, r_vals, r_log_z = reference(z, 16, temps)
    assert ids.shape == (48, 16) and log_z.shape == (48, len(temps)) and log_z.dtype == torch.float32
    assert torch.equal(ids, r_ids)
    assert torch.equal(vals.double(), r_vals)  # raw logits, bit for bit
    err = (log_z.double() - r_log_z).abs().max().item()
    assert err < 1e-6 * r_log_z.abs().max().item() + 1e-6, f"log Z off by {err:.2e}"


@pytest.mark.parametrize("vocab", [110, 3000, 30522, 30528])
@pytest.mark.parametrize("k", [1, 8, 32, 64])
def test_blocked_topk_equals_torch_topk(vocab: int, k: int) -> None:
    """The blocked top-k (block maxima, then the best blocks) against torch.topk, with winners
    planted in the partial block at the end of the vocabulary and in one block together."""
    z = logits(64, vocab, 3.0, seed=vocab + k)
    z[::2, -1] += 30  # the tail past the last full block of 64
    z[1::4, 128:128 + 40] += 25  # many winners in one block
    vals, ids = topk(z.clone(), k)
    r_vals, r_ids = torch.topk(z, k, dim=-1, sorted=True)
    assert torch.equal(vals, r_vals)
    distinct = (r_vals[:, 1:] != r_vals[:, :-1]).all(dim=-1)  # ties may come in either order
    assert distinct.float().mean() > 0.9
    assert torch.equal(ids[distinct], r_ids[distinct])
    assert torch.equal(z.gather(1, ids), vals)


@pytest.mark.parametrize("temps", [(1.0, 2.0, 4.0), (1.0, 1.5, 3.0), (0.5, 1.0, 2.0, 4.0)])
def test_softened_topk_is_exact(temps: tuple[float, ...]) -> None:
    """exp(v / T - log Z_T) at the stored ids equals the float64 softmax there; with k = V the
    stored values hold the whole distribution and sum to 1 at every T."""
    vocab = 500
    z = logits(32, vocab, 5.0, seed=3)
    for k in (8, vocab):
        ids, vals, log_z = reduce_logits(z.clone(), k, temps)
        # log Z is stored in float32: its rounding (~1e-7 relative) bounds the relative error
        tol = 1e-6 + 4 * torch.finfo(torch.float32).eps * log_z.abs().max().item()
        for j, t in enumerate(temps):
            p = torch.exp(vals.double() / t - log_z[:, j:j + 1].double())
            ref = torch.softmax(z.double() / t, dim=-1).gather(1, ids)
            assert ((p - ref).abs() / ref).max().item() < tol
            if k == vocab:
                assert (p.sum(-1) - 1).abs().max().item() < 1e-5
            else:  # the mass outside the top-k is known, not assumed zero
                tail = 1 - p.sum(-1)
                assert (tail - (1 - ref.sum(-1))).abs().max().item() < tol


def test_wide_logits_keep_their_tail_at_high_temperature() -> None:
    """Logits spread over 100 units: exp((z - max) / 0.25) underflows float32 below z - max = -26,
    yet at T = 4 the logits below that still hold 0.2% of the mass; they must count."""
    z = torch.linspace(0, -100, 4000).repeat(4, 1)
    temps = (0.25, 1.0, 4.0)
    _, _, log_z = reduce_logits(z.clone(), 8, temps)
    _, _, r_log_z = reference(z, 8, temps)
    assert (log_z.double() - r_log_z).abs().max().item() < 1e-5


# ------------------------------------------------------------------------- the real teacher

def batch(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(texts, padding=True, return_tensors="pt", return_token_type_ids=False)
    return enc["input_ids"], enc["attention_mask"]


TEXTS = ["the king of the north .", "a river", "the old city was on the long road by the water ."]


@pytest.mark.parametrize("temps", [(1.0, 2.0, 4.0), (1.0, 1.5, 3.0)])
@pytest.mark.parametrize("chunk", [None, 7])
def test_runner_matches_the_models_own_logits(teacher_model, tokenizer, temps, chunk) -> None:
    """TeacherRunner.run on a padded batch: per non-padding position, top-k ids/values, log Z at
    each T and the projected hidden state, against the model's full float64 logits."""
    hidden = teacher_model.config.hidden_size
    proj = torch.linalg.qr(torch.randn(hidden, 12, generator=torch.Generator().manual_seed(0)))[0]
    runner = TeacherRunner(teacher_model, 8, temps, proj, torch.device("cpu"), chunk=chunk)
    ids, att = batch(tokenizer, TEXTS)
    assert (att == 0).any(), "the batch must hold padding"
    out = runner.run(ids, att)
    with torch.inference_mode():
        ref = teacher_model(input_ids=ids, attention_mask=att, output_hidden_states=True)
    valid = att.bool()
    z = ref.logits[valid]  # (N, V)
    n = int(valid.sum())
    assert out.topk_ids.shape == (n, 8) and out.log_z.shape == (n, len(temps)) and out.hidden.shape == (n, 12)
    r_ids, r_vals, r_log_z = reference(z, 8, runner.temperatures)
    assert (torch.from_numpy(out.topk_ids) == r_ids).all()
    assert (torch.from_numpy(out.topk_logits).double() - r_vals).abs().max().item() < 1e-5
    assert (torch.from_numpy(out.log_z).double() - r_log_z).abs().max().item() < 1e-5
    r_hidden = ref.hidden_states[-1][valid].double() @ proj.double()
    assert (torch.from_numpy(out.hidden).double() - r_hidden).abs().max().item() < 1e-5


def test_runner_on_a_wide_vocabulary() -> None:
    """4000 tokens, 300 positions in chunks of 128: the blocked top-k on the runner's path."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=4000, hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=64)).eval()
    runner = TeacherRunner(model, 8, (1.0, 1.5, 3.0), torch.eye(32), torch.device("cpu"), chunk=128)
    ids = torch.randint(5, 4000, (3, 100))
    att = torch.ones_like(ids)
    out = runner.run(ids, att)
    with torch.inference_mode():
        z = model(input_ids=ids, attention_mask=att).logits.reshape(300, -1)
    r_ids, r_vals, r_log_z = reference(z, 8, runner.temperatures)
    assert (torch.from_numpy(out.topk_logits).double() - r_vals).abs().max().item() < 1e-5
    assert (torch.from_numpy(out.topk_ids) == r_ids).float().mean().item() > 0.99  # ties aside
    assert (torch.from_numpy(out.log_z).double() - r_log_z).abs().max().item() < 1e-5


def test_runner_sorts_the_grid(teacher_model) -> None:
    runner = TeacherRunner(teacher_model, 4, (3.0, 1.0, 1.5), torch.eye(32), torch.device("cpu"))
    assert runner.temperatures == (1.0, 1.5, 3.0)


def test_check_head_split_passes_on_bert(teacher_model, tokenizer) -> None:
    runner = TeacherRunner(teacher_model, 8, (1.0,), torch.eye(32), torch.device("cpu"))
    assert runner.check_head_split(*batch(tokenizer, TEXTS)) < 1e-4


def test_decoder_bypass_is_undone(teacher_model, tokenizer) -> None:
    ids, att = batch(tokenizer, TEXTS[:1])
    with torch.inference_mode():
        before = teacher_model(input_ids=ids, attention_mask=att).logits
        with decoder_bypassed(teacher_model):
            inner = teacher_model(input_ids=ids, attention_mask=att).logits
        after = teacher_model(input_ids=ids, attention_mask=att).logits
    assert inner.shape[-1] == teacher_model.config.hidden_size
    assert torch.equal(before, after)


def test_hashes_follow_weights_and_vocabulary(teacher_dir: Path, other_teacher_dir: Path,
                                               teacher_model, tokenizer) -> None:
    from kdpipe.pipeline.teacher import load_tokenizer

    again = load_teacher(str(teacher_dir))
    assert weights_sha256(again) == weights_sha256(teacher_model)
    assert weights_sha256(load_teacher(str(other_teacher_dir))) != weights_sha256(teacher_model)
    assert tokenizer_sha256(load_tokenizer(str(other_teacher_dir))) == tokenizer_sha256(tokenizer)


def test_teacher_without_mlm_head_is_refused(tmp_path: Path, teacher_dir: Path) -> None:
    from transformers import BertConfig, BertModel

    folder = tmp_path / "encoder-only"
    BertModel(BertConfig.from_pretrained(teacher_dir)).save_pretrained(folder)
    with pytest.raises(KdpipeError, match="no trained masked-LM head"):
        load_teacher(str(folder))


def test_folder_without_config_is_refused(tmp_path: Path, teacher_dir: Path) -> None:
    folder = tmp_path / "no-config"
    shutil.copytree(teacher_dir, folder)
    (folder / "config.json").unlink()
    with pytest.raises(KdpipeError, match="no config.json"):
        load_teacher(str(folder))


def test_a_missing_model_folder_is_named_as_such(tmp_path):
    from kdpipe.pipeline.errors import KdpipeError
    from kdpipe.pipeline.teacher import resolve_model_path

    with pytest.raises(KdpipeError, match="does not exist"):
        resolve_model_path(str(tmp_path / "no-such-teacher"))
    assert resolve_model_path("bert-base-uncased") == "bert-base-uncased"  # an id: left to the HF cache
