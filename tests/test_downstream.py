"""Downstream tasks: loading every format, the fixed-seed split, and a deterministic fine-tune."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kdpipe.pipeline import downstream
from kdpipe.pipeline.errors import KdpipeError

# Words only: the tiny vocabulary of helpers.py lists "a" twice, so its last id (the digit "2")
# is one past the model's embedding table.
NOUNS = "film book city river music war king game team school".split()
ROWS = [{"sentence": f"the {NOUNS[i % 10]} of {NOUNS[i * 7 % 10]} was {'great' if i % 3 else 'old'}",
         "y": "pos" if i % 3 else "neg"} for i in range(30)]


def write(path: Path, rows: list[dict] = ROWS) -> Path:
    fmt = path.suffix
    if fmt in (".csv", ".tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if fmt == ".csv" else "\t")
            w.writeheader()
            w.writerows(rows)
    elif fmt == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ------------------------------------------------------------------------------------ loading

@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_every_format_loads_the_same_task(tmp_path: Path, suffix: str) -> None:
    t = downstream.load_task(str(write(tmp_path / f"reviews{suffix}")), "sentence", "y")
    assert t.name == "reviews"
    assert t.texts == [r["sentence"] for r in ROWS]
    assert t.labels == [r["y"] for r in ROWS]
    assert t.label_names == ["neg", "pos"]
    assert t.label_counts() == {"neg": 10, "pos": 20}
    assert len(t.fingerprint["sha256"]) == 64 and t.dropped == 0


def test_numeric_labels_become_strings_and_empty_rows_are_dropped(tmp_path: Path) -> None:
    rows = [{"text": "a film", "label": 1}, {"text": "a book", "label": 0}, {"text": "", "label": 1},
            {"text": "the city", "label": None}, {"text": "a war", "label": 10}]
    t = downstream.load_task(str(write(tmp_path / "t.jsonl", rows)))
    assert t.labels == ["1", "0", "10"] and t.label_names == ["0", "1", "10"]  # numeric order
    assert t.dropped == 2


def test_missing_column_names_it_and_the_flag(tmp_path: Path) -> None:
    path = str(write(tmp_path / "t.csv"))
    with pytest.raises(KdpipeError, match=r"no column 'text' \(columns: sentence, y\); set --text-column"):
        downstream.load_task(path)
    with pytest.raises(KdpipeError, match="no column 'label'.*--label-column"):
        downstream.load_task(path, "sentence")


def test_one_class_missing_file_and_bad_suffix_are_refused(tmp_path: Path) -> None:
    one = [{"text": f"film {i}", "label": "pos"} for i in range(5)]
    with pytest.raises(KdpipeError, match=r"single label \('pos' in column 'label'\); classification"):
        downstream.load_task(str(write(tmp_path / "one.jsonl", one)))
    with pytest.raises(KdpipeError, match="does not exist"):
        downstream.load_task(str(tmp_path / "nope.csv"))
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(KdpipeError, match="unsupported task file"):
        downstream.load_task(str(tmp_path / "t.xlsx"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{oops\n')
    with pytest.raises(KdpipeError, match="line 2: not valid JSON"):
        downstream.load_task(str(tmp_path / "bad.jsonl"))


def test_builtin_task_goes_through_builtin_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builtin = pytest.importorskip("kdpipe.pipeline.builtin")
    target = write(tmp_path / "movie-sentiment.jsonl",
                   [{"text": r["sentence"], "label": r["y"]} for r in ROWS])
    calls = []
    monkeypatch.setattr(builtin, "resolve", lambda spec, kind: calls.append((spec, kind)) or str(target))
    t = downstream.load_task("builtin:movie-sentiment")
    assert calls == [("builtin:movie-sentiment", "task")]
    assert t.name == "movie-sentiment" and t.spec == "builtin:movie-sentiment" and len(t.texts) == 30


# -------------------------------------------------------------------------------------- split

def test_split_is_deterministic_disjoint_and_complete() -> None:
    a = downstream.split_indices(1000, 0.1, seed=0)
    b = downstream.split_indices(1000, 0.1, seed=0)
    assert a == b
    assert len(a.dev) == 100 and a.train_pool == 900
    assert not set(a.train) & set(a.dev)
    assert sorted(a.train + a.dev) == list(range(1000))
    assert a.dev == sorted(a.dev)
    other = downstream.split_indices(1000, 0.1, seed=1)
    assert other.dev != a.dev
    # the split is a function of (seed, index) through SHA-256: pinned, so no library can move it
    assert a.dev == sorted(sorted(range(1000), key=lambda i: downstream.split_rank(0, i))[:100])
    assert downstream.split_rank(0, 0).hex()[:16] == "43a4159d2aaaa3e5"


def test_split_caps_take_a_fixed_subset_and_tiny_sets_still_split() -> None:
    full = downstream.split_indices(200, 0.25, seed=3)
    capped = downstream.split_indices(200, 0.25, seed=3, max_train=20, max_dev=7)
    assert capped.train == full.train[:20]
    assert set(capped.dev) <= set(full.dev) and len(capped.dev) == 7
    assert (capped.train_pool, capped.dev_pool) == (150, 50)
    two = downstream.split_indices(2, 0.1, seed=0)
    assert len(two.train) == 1 and len(two.dev) == 1
    with pytest.raises(KdpipeError):
        downstream.split_indices(1, 0.1, seed=0)
    rec = capped.record(200, "splits/t.json")
    assert rec["train"] == 20 and rec["dev"] == 7 and len(rec["dev_indices_sha256"]) == 64


def test_linear_schedule() -> None:
    assert [downstream.linear_schedule(s, 2, 6) for s in range(7)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert downstream.linear_schedule(0, 0, 4) == 1.0


# ---------------------------------------------------------------------------------- fine-tune

def test_finetune_is_deterministic_per_seed(tmp_path: Path, teacher_dir: Path, tokenizer) -> None:
    task = downstream.load_task(str(write(tmp_path / "t.jsonl",
                                          [{"text": r["sentence"], "label": r["y"]} for r in ROWS])))
    split = downstream.split_indices(len(task.texts), 0.3, seed=0)
    enc = downstream.encode_task(tokenizer, task, split, max_length=16)
    assert len(enc.train_ids) == 21 and len(enc.dev_ids) == 9
    assert all(len(x) <= 16 and x[0] == tokenizer.cls_token_id for x in enc.train_ids)
    recipe = downstream.Recipe(lr=1e-3, epochs=2, batch_size=8, max_length=16, eval_batch_size=4)
    run = lambda seed: downstream.finetune_and_score(  # noqa: E731
        str(teacher_dir), tokenizer.pad_token_id, enc, task.label_names, recipe, seed, torch.device("cpu"))
    a, b = run(0), run(0)
    assert {k: v for k, v in a.items() if k != "train_seconds"} == \
        {k: v for k, v in b.items() if k != "train_seconds"}
    assert a["steps"] == 2 * 3 and 0 <= a["accuracy"] <= 1 and 0 <= a["macro_f1"] <= 1


def test_the_transfer_set_is_the_training_pool_after_the_examples_fine_tuned_on() -> None:
    full = downstream.split_indices(100, 0.2, seed=3)
    split = downstream.split_indices(100, 0.2, seed=3, max_train=30, transfer=20)
    assert split.train == full.train[:30] and split.transfer == full.train[30:50] and split.dev == full.dev
    assert split.record(100, "f")["transfer"] == 20
    assert downstream.split_indices(100, 0.2, seed=3, max_train=70, transfer=20).transfer == full.train[70:]
    assert downstream.split_indices(100, 0.2, seed=3, transfer=20).transfer == []  # no cap: nothing left
    assert "transfer" not in full.record(100, "f")


def test_task_distillation_fine_tunes_toward_the_teachers_logits(tmp_path: Path, teacher_dir: Path,
                                                                 tokenizer) -> None:
    """With alpha = 1 the labels carry no weight: a student distilled from a 'teacher' that calls
    every example the minority class learns to say so, where plain fine-tuning does not; with
    alpha < 1 both count. The logits a fine-tune keeps of its training examples are its own."""
    task = downstream.load_task(str(write(tmp_path / "t.jsonl",
                                          [{"text": r["sentence"], "label": r["y"]} for r in ROWS])))
    split = downstream.split_indices(len(task.texts), 0.3, seed=0)
    enc = downstream.encode_task(tokenizer, task, split, max_length=16)
    recipe = downstream.Recipe(lr=3e-3, epochs=4, batch_size=8, max_length=16, eval_batch_size=4)
    cpu = torch.device("cpu")
    neg = task.label_names.index("neg")
    contrary = torch.full((len(enc.train_ids), 2), -4.0)
    contrary[:, neg] = 4.0  # (N, C): "neg" everywhere; the labels say pos for 2 in 3
    run = lambda soft=None, keep=False: downstream.finetune_and_score(  # noqa: E731
        str(teacher_dir), tokenizer.pad_token_id, enc, task.label_names, recipe, 0, cpu, soft=soft,
        train_logits=keep)
    plain = run(keep=True)
    logits = torch.tensor(plain["train_logits"])
    assert logits.shape == (21, 2) and torch.isfinite(logits).all() and "task_distill" not in plain
    assert neg not in set(plain["dev_predictions"])  # plain fine-tuning: the majority class
    distilled = run(downstream.SoftLabels(contrary, alpha=1.0, temperature=2.0))
    assert set(distilled["dev_predictions"]) == {neg}
    assert distilled["task_distill"] == {"alpha": 1.0, "temperature": 2.0} and "train_logits" not in distilled
    mixed = run(downstream.SoftLabels(contrary, alpha=0.5, temperature=2.0))
    assert mixed == run(downstream.SoftLabels(contrary, alpha=0.5, temperature=2.0)) | {
        "train_seconds": mixed["train_seconds"]}  # deterministic
    with pytest.raises(ValueError, match="soft labels of shape"):
        run(downstream.SoftLabels(contrary[:5], alpha=0.5, temperature=2.0))
    # a transfer set: unlabelled examples the teacher labels; a plain fine-tune ignores them
    pool = downstream.split_indices(len(task.texts), 0.3, seed=0, max_train=12, transfer=9)
    enc = downstream.encode_task(tokenizer, task, pool, max_length=16)
    assert (len(enc.train_ids), len(enc.transfer_ids)) == (12, 9)
    plain = run()
    assert plain["steps"] == 4 * 2 and len(run(keep=True)["train_logits"]) == 12 + 9
    transfer = run(downstream.SoftLabels(torch.zeros(12 + 9, 2), alpha=0.5, temperature=2.0))
    assert transfer["steps"] == 4 * 3  # ceil(21 / 8) per epoch: the transfer examples are trained on


# -------------------------------------------------------------------------------------- sweep

def test_tune_split_is_a_fixed_part_of_the_training_examples() -> None:
    split = downstream.split_indices(1000, 0.1, seed=0, max_train=500)
    tune = downstream.tune_split(split.train, 0.2, seed=0)
    assert tune == downstream.tune_split(split.train, 0.2, seed=0) == sorted(tune)
    assert len(tune) == 100 and set(tune) < set(split.train) and not set(tune) & set(split.dev)
    assert downstream.tune_split(split.train, 0.2, seed=1) != tune
    # its own SHA-256 ranking, not the dev split's: the first-ranked training examples are not it
    assert tune != sorted(sorted(split.train, key=lambda i: downstream.split_rank(0, i))[:100])
    assert len(downstream.tune_split([4, 9], 0.01, seed=0)) == 1  # one each side, however small
    assert len(downstream.tune_split([4, 9], 0.99, seed=0)) == 1
    with pytest.raises(KdpipeError, match="from 1 training example"):
        downstream.tune_split([3], 0.5, seed=0)


def test_choose_prefers_accuracy_then_f1_then_the_cheaper_point() -> None:
    def P(lr: float, epochs: int, accuracy: float, macro_f1: float) -> downstream.SweepPoint:
        return downstream.SweepPoint(lr=lr, epochs=epochs, accuracy=accuracy, macro_f1=macro_f1)

    assert downstream.choose([P(1e-4, 2, 0.8, 0.7), P(2e-4, 3, 0.9, 0.1)]) == P(2e-4, 3, 0.9, 0.1)
    assert downstream.choose([P(1e-4, 2, 0.8, 0.7), P(2e-4, 3, 0.8, 0.75)]) == P(2e-4, 3, 0.8, 0.75)
    assert downstream.choose([P(1e-4, 4, 0.8, 0.7), P(2e-4, 2, 0.8, 0.7)]) == P(2e-4, 2, 0.8, 0.7)
    assert downstream.choose([P(2e-4, 2, 0.8, 0.7), P(1e-4, 2, 0.8, 0.7)]) == P(1e-4, 2, 0.8, 0.7)


def test_one_sweep_run_scores_every_epoch_count_as_a_stopped_run_would(tmp_path: Path, teacher_dir: Path,
                                                                      tokenizer) -> None:
    """A rate's sweep run, scored after 1 and 3 epochs, gives what a run of the chosen epochs of a
    3-epoch schedule gives on the same data: the final fine-tuning repeats the point it chose."""
    task = downstream.load_task(str(write(tmp_path / "t.jsonl",
                                          [{"text": r["sentence"], "label": r["y"]} for r in ROWS])))
    split = downstream.split_indices(len(task.texts), 0.2, seed=0)
    tune = downstream.tune_split(split.train, 0.25, seed=0)
    enc = downstream.encode_task(tokenizer, task, split, max_length=16)
    data = downstream.carve(enc, split.train, tune)
    fit = [i for i in split.train if i not in tune]
    assert data.train_y == downstream.class_indices(task, fit) and data.dev_y == downstream.class_indices(task, tune)
    assert len(data.train_ids) == 18 and len(data.dev_ids) == 6
    recipe = downstream.Recipe(lr=2e-3, epochs=1, batch_size=4, max_length=16, eval_batch_size=4)
    cpu = torch.device("cpu")
    swept = downstream.sweep_rate(str(teacher_dir), tokenizer.pad_token_id, data, task.label_names,
                                  recipe, [1, 3], seed=2, device=cpu)
    assert set(swept["scores"]) == {"1", "3"} and swept["steps"] == 3 * 5
    for e in (1, 3):
        stopped = downstream.finetune_and_score(
            str(teacher_dir), tokenizer.pad_token_id, data, task.label_names,
            downstream.Recipe(**{**recipe.__dict__, "epochs": e, "schedule_epochs": 3}), seed=2, device=cpu)
        assert stopped["steps"] == 5 * e and (stopped["epochs"], stopped["schedule_epochs"]) == (e, 3)
        assert swept["scores"][str(e)] == {"accuracy": stopped["accuracy"], "macro_f1": stopped["macro_f1"]}
    # the weights too: scoring after an epoch leaves the run as it was, bit for bit
    ft = lambda r, hook=None: downstream.finetune(  # noqa: E731
        str(teacher_dir), tokenizer.pad_token_id, data, task.label_names, r, 2, cpu, hook)[0]
    seen: dict[int, list[torch.Tensor]] = {}
    ft(downstream.Recipe(**{**recipe.__dict__, "epochs": 3}),
       lambda done, m: seen.__setitem__(done, [p.detach().clone() for p in m.parameters()]))
    stopped = ft(downstream.Recipe(**{**recipe.__dict__, "schedule_epochs": 3}))
    assert all(torch.equal(a, b) for a, b in zip(seen[1], stopped.parameters()))
    # and the schedule is what differs from a plain 1-epoch run, whose decay reaches 0 after 1 epoch
    assert any(not torch.equal(a, b) for a, b in zip(ft(recipe).parameters(), stopped.parameters()))


def test_length_grouped_batches_cover_every_example_once_with_less_padding() -> None:
    lengths = [3 + (i * 37) % 50 for i in range(1000)]
    plain = downstream.train_batches(lengths, 32, torch.Generator().manual_seed(0), False)
    grouped = downstream.train_batches(lengths, 32, torch.Generator().manual_seed(0), True)
    again = downstream.train_batches(lengths, 32, torch.Generator().manual_seed(0), True)
    assert grouped == again and len(grouped) == len(plain) == 32  # ceil(1000 / 32) steps either way
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert sum(len(b) < 32 for b in grouped) == 1
    # the same permutation underneath: without grouping, exactly the old recipe's batches
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    assert plain == [perm[b:b + 32] for b in range(0, 1000, 32)]
    padded = lambda bs: sum(len(b) * max(lengths[i] for i in b) for b in bs)  # noqa: E731
    assert padded(grouped) < 0.7 * padded(plain)
    first = [max(lengths[i] for i in b) for b in grouped[:8]]
    assert first != sorted(first)  # batch order is shuffled, not longest last
