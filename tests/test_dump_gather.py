"""A shard's teacher columns gathered straight from the batches' outputs (dump.gather_outputs):
the same rows, in row order, as cutting every batch into per-row pieces and joining them, narrowed
to the stored dtypes in one pass where every value fits, and kept as made where one does not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdpipe.pipeline.dump import RowSpec, dump_shard, gather_outputs, length_batches
from kdpipe.pipeline.masking import MaskingSpec, Vocabulary
from kdpipe.pipeline.shards import as_stored, fits, gathered, stored_dtypes
from kdpipe.pipeline.teacher import TeacherOutputs, TeacherRunner
from kdpipe.schemas.shard import shard_schema


def per_row_reference(outs: list[TeacherOutputs], batches: list[list[int]], length: np.ndarray,
                      n_target: np.ndarray, name: str) -> np.ndarray:
    """The plain way: each batch's outputs cut into per-row pieces, joined in row order."""
    pieces: dict[int, np.ndarray] = {}
    for o, batch in zip(outs, batches):
        v = getattr(o, name)
        tok = np.cumsum([0, *length[batch]])
        tgt = np.cumsum([0, *n_target[batch]])
        smp = np.cumsum([0, *o.sample_len]) if o.sample_len is not None else None
        for j, r in enumerate(batch):
            if name in ("hidden", "hidden_layers"):
                pieces[r] = v[tok[j]:tok[j + 1]]
            elif name in ("sample_ids", "sample_counts"):
                pieces[r] = v[smp[tgt[j]]:smp[tgt[j + 1]]]
            else:
                pieces[r] = v[tgt[j]:tgt[j + 1]]
    return np.concatenate([pieces[r] for r in range(len(length))])


def random_outputs(batches: list[list[int]], length: np.ndarray, n_target: np.ndarray, seed: int = 0
                   ) -> list[TeacherOutputs]:
    rng = np.random.default_rng(seed)
    outs = []
    for batch in batches:
        n, p = int(length[batch].sum()), int(n_target[batch].sum())
        slen = rng.integers(1, 5, size=p)
        outs.append(TeacherOutputs(
            hidden=rng.standard_normal((n, 6), dtype=np.float32),
            hidden_layers=rng.standard_normal((n, 12), dtype=np.float32),
            topk_ids=rng.integers(0, 30000, size=(p, 4)), topk_logits=rng.standard_normal((p, 4), dtype=np.float32),
            log_z=rng.standard_normal((p, 3), dtype=np.float32),
            sample_ids=rng.integers(0, 30000, size=int(slen.sum())), sample_counts=rng.integers(1, 9, size=int(slen.sum())),
            sample_len=slen, teacher_state=rng.standard_normal((p, 5), dtype=np.float32)))
    return outs


@pytest.mark.parametrize("masked", [False, True])
def test_rows_of_batches_in_any_order_come_back_in_row_order(masked: bool) -> None:
    rng = np.random.default_rng(1)
    length = rng.integers(3, 20, size=23)
    n_target = np.array([rng.integers(0, n + 1) for n in length]) if masked else length
    n_target[5] = 0  # a row without targets
    batches = [list(b) for b in np.array_split(rng.permutation(23), 4)]
    outs = random_outputs(batches, length, n_target)
    order = np.concatenate(batches).astype(np.int64)
    cols = gather_outputs(outs, order, length, n_target, {})
    assert set(cols) == {"hidden", "hidden_layers", "topk_ids", "topk_logits", "log_z", "sample_ids",
                         "sample_counts", "sample_len", "teacher_state"}
    for name, got in cols.items():
        want = per_row_reference(outs, batches, length, n_target, name)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_consecutive_batches_are_joined_without_a_scatter_and_narrowed_once() -> None:
    length = np.full(10, 7)
    batches = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    outs = random_outputs(batches, length, length, seed=2)
    stored = {"hidden": np.dtype(np.float16), "topk_ids": np.dtype(np.uint16), "topk_logits": np.dtype(np.float16)}
    cols = gather_outputs(outs, np.arange(10), length, length, stored)
    for name in ("hidden", "topk_ids", "topk_logits", "log_z"):
        want = per_row_reference(outs, batches, length, length, name)
        want = as_stored(want, stored[name]) if name in stored else want
        assert cols[name].dtype == want.dtype, name
        np.testing.assert_array_equal(cols[name].view(np.uint8), want.view(np.uint8), err_msg=name)


def test_a_column_with_a_value_that_does_not_fit_stays_as_the_teacher_made_it() -> None:
    parts = [np.ones((3, 2), np.float32), np.array([[1.0, 65505.0]], np.float32)]
    kept = gathered(parts, None, np.dtype(np.float16))
    assert kept.dtype == np.float32 and kept[3, 1] == 65505.0  # the check can quote it
    assert gathered(parts[:1], None, np.dtype(np.float16)).dtype == np.float16
    f16 = np.dtype(np.float16)
    edge = gathered([np.array([[65504.0, -65504.0, 1.0]], np.float32)], None, f16)  # the largest float16s
    assert edge.dtype == np.float16 and edge.tolist() == [[65504.0, -65504.0, 1.0]]
    for bad in (-65510.0, np.nan, -np.inf, 1e9):
        kept = gathered([np.ones((2, 2), np.float32), np.array([[0.5, bad]], np.float32)], np.array([2, 0, 1]), f16)
        assert kept.dtype == np.float32 and (np.isnan(kept[1, 1]) if np.isnan(bad) else kept[1, 1] == bad)  # row 2 -> 1
    assert fits(np.array([65504.0], np.float32), np.dtype(np.float16))
    assert not fits(np.array([1.0, np.nan], np.float32), np.dtype(np.float16))
    assert not fits(np.array([-np.inf], np.float32), np.dtype(np.float16))
    assert not fits(np.array([65536]), np.dtype(np.uint16)) and not fits(np.array([-1]), np.dtype(np.uint16))
    assert fits(np.array([0, 65535]), np.dtype(np.uint16))


def test_dump_shard_narrowed_as_it_gathers_equals_narrowing_afterwards(teacher_model) -> None:
    """A real teacher, rows of many lengths (batches by length: not consecutive rows), two views,
    targets at masked positions: the stored-dtype shard is the plain one narrowed, bit for bit."""
    from kdpipe.pipeline.shards import narrowed

    rng = np.random.default_rng(3)
    vocab = Vocabulary(int(teacher_model.config.vocab_size), 4, np.array([0, 1, 2, 3, 4], dtype=np.int64))
    seqs = [np.concatenate([[2], rng.integers(5, vocab.size, size=int(n)), [3]]) for n in rng.integers(3, 30, 13)]
    runner = TeacherRunner(teacher_model, 8, (1.0, 2.0), torch.eye(teacher_model.config.hidden_size)[:, :16],
                           torch.device("cpu"))
    spec = RowSpec(MaskingSpec(seed=5), 2, vocab, vocab.random_pool(), None, "topk", "masked", 0, 4, 0)
    schema = shard_schema(vocab.size, 8, 2, 16)
    plain = dump_shard(spec, runner, 40, seqs)
    fast = dump_shard(spec, runner, 40, seqs, stored=stored_dtypes(schema))
    from kdpipe.pipeline.masking import mask_sequences

    order = sum(length_batches(mask_sequences(seqs, 40, 2, spec.masking, vocab, spec.pool), 4), [])
    assert order != sorted(order)  # the batches are not runs of consecutive rows
    assert fast.hidden.dtype == np.float16 and fast.topk_ids.dtype == np.uint16 and fast.log_z.dtype == np.float32
    want = narrowed(plain, schema)
    for name in ("seq_id", "view", "length", "input_ids", "mlm_count", "mlm_positions", "mlm_labels",
                 "target_count", "hidden", "topk_ids", "topk_logits", "log_z"):
        a, b = getattr(fast, name), getattr(want, name)
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
