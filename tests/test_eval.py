"""`kdpipe eval` end to end on tiny models: the report, resuming, refusals, bad inputs."""

from __future__ import annotations

import itertools
import json
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from transformers import BertConfig, BertForMaskedLM

from helpers import WORDS, tiny_corpus
from kdpipe.pipeline import downstream
from kdpipe.pipeline.cli import cli
from kdpipe.schemas.report import Report

STUDENTS = ("full", "no-ce")
FAST = ("--seeds", "2", "--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--seq-len", "32",
        "--heldout-sequences", "16", "--speed-repeats", "2", "--speed-warmup", "1",
        "--speed-batch-size", "4", "--speed-seq-len", "16", "--max-train-examples", "40")


def make_student(root: Path, teacher_dir: Path, name: str, seed: int, metrics: bool = True,
                 final: bool = True) -> Path:
    """A student-train run directory as stage two leaves it: final/, metrics.jsonl, run.json."""
    run = root / name
    run.mkdir(parents=True)
    if final:
        torch.manual_seed(seed)
        teacher_cfg = BertConfig.from_pretrained(teacher_dir)
        cfg = BertConfig(vocab_size=teacher_cfg.vocab_size, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
        BertForMaskedLM(cfg).save_pretrained(run / "final")
        from safetensors.torch import save_file  # student-train keeps its hidden map beside the model

        save_file({"weight": torch.zeros(16, 32)}, str(run / "final" / "kdpipe_hidden_map.safetensors"))
        for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json"):
            if (teacher_dir / f).exists():
                shutil.copy(teacher_dir / f, run / "final" / f)
    (run / "run.json").write_text(json.dumps({"format": "kdpipe-run", "cache": str(root / "cache")}))
    if metrics:
        rnd = random.Random(seed)
        with open(run / "metrics.jsonl", "w") as f:
            for step in range(10, 310, 10):
                ce = 0.0 if name == "no-ce" else 3 * 0.99 ** step + 0.1 * rnd.random()
                mlm, cos = 4 * 0.992 ** step + 0.1 * rnd.random(), 0.5 * 0.995 ** step
                f.write(json.dumps({"step": step, "loss": 5 * ce + 2 * mlm + cos, "loss_ce": ce,
                                    "loss_mlm": mlm, "loss_cos": cos, "lr": 1e-4,
                                    "tokens_per_s": 1e3, "epoch": 0}) + "\n")
            f.write('{"step": 310, "loss": ')  # a torn last line, as a killed run leaves
    return run


def write_task(path: Path, labels: tuple[str, ...] = ("pos", "neg"), n: int = 60) -> Path:
    rnd = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            label = labels[i % len(labels)]
            cue = ["great", "light"] if label == "pos" else ["war", "old"]
            f.write(json.dumps({"text": " ".join(rnd.choice(WORDS) for _ in range(5)) + " " + " ".join(cue),
                                "label": label}) + "\n")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("eval")
    for i, name in enumerate(STUDENTS):
        make_student(root, teacher_dir, name, seed=i + 1)
    tiny_corpus(root / "heldout.txt", lines=30, seed=7)
    write_task(root / "task.jsonl")
    return root


def kdpipe(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["eval", *map(str, args)])


def base_args(work: Path, teacher_dir: Path, out: Path) -> list[str | Path]:
    return ["--teacher", teacher_dir, "--student", work / "full", "--student", work / "no-ce",
            "--task", work / "task.jsonl", "--heldout", work / "heldout.txt", "--out", out, *FAST]


def ok(result: Result) -> dict:
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def one_line_error(result: Result, *needles: str) -> str:
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def report_dir(work: Path, teacher_dir: Path) -> Path:
    out = work / "report"
    summary = ok(kdpipe(*base_args(work, teacher_dir, out)))
    # speed + 3 masked-LM parts + 2 seeds x 1 task x 3 models
    assert summary["computed"] == 1 + 3 + 6 and summary["reused"] == 0
    return out


def parts_mtimes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in (out / "parts").rglob("*.json")}


# ------------------------------------------------------------------------------------ the report

def test_report_has_every_table_and_plot(report_dir: Path) -> None:
    import matplotlib.image as mpimg

    report = Report.model_validate_json((report_dir / "report.json").read_text())
    assert report.format_version == 1 and report.students == list(STUDENTS)
    assert report.plots == ["training_curves.png", "retention.png", "tradeoff.png"]
    for name in report.plots:
        data = (report_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(report_dir / name)
        assert img.shape[0] > 200 and img.shape[1] > 300
    md = (report_dir / "report.md").read_text()
    for section in ("## Summary", "## Ablation", "## Masked LM on held-out text", "## Downstream: task",
                    "## Size and speed", "![Training curves](training_curves.png)"):
        assert section in md
    for s in STUDENTS:  # a row in summary, ablation, masked LM, downstream, speed and models tables
        assert md.count(f"| {s} |") == 6, s
    assert report.provenance["code_revision"] and report.provenance["versions"]["torch"]


def test_report_numbers_are_consistent(report_dir: Path) -> None:
    report = Report.model_validate_json((report_dir / "report.json").read_text())
    mlm = {r.model: r for r in report.mlm.results}
    assert mlm["teacher"].teacher_agreement is None and mlm["teacher"].kl_teacher_student is None
    assert len({r.masked_tokens for r in mlm.values()}) == 1 and mlm["full"].masked_tokens > 0
    for s in STUDENTS:
        assert mlm[s].kl_teacher_student >= 0 and 0 <= mlm[s].teacher_agreement <= 1
        assert mlm[s].top1_accuracy <= mlm[s].top5_accuracy
    (task,) = report.tasks
    teacher = next(r for r in task.results if r.model == "teacher")
    for r in task.results:
        assert [x.seed for x in r.seeds] == [0, 1]
        assert r.accuracy.min <= r.accuracy.median <= r.accuracy.max
        if r.model != "teacher":
            assert r.accuracy_retention == pytest.approx(100 * r.accuracy.median / teacher.accuracy.median)
    split = json.loads((report_dir / task.split.file).read_text())
    assert not set(split["train"]) & set(split["dev"])
    assert task.split.train == len(split["train"]) == 40 and task.split.dev == len(split["dev"]) == 6
    speed = {r.model: r for r in report.speed.results}
    assert speed["teacher"].latency_speedup == 1.0 and speed["full"].latency_ms.median > 0
    sizes = {m.name: m for m in report.models}
    assert sizes["full"].parameters < sizes["teacher"].parameters
    assert sizes["full"].weights_files == ["model.safetensors"]  # not the hidden map beside it
    assert sizes["full"].weights_bytes == (Path(sizes["full"].path) / "model.safetensors").stat().st_size
    assert sizes["full"].metrics_file and sizes["teacher"].metrics_file is None
    assert report.baseline == "full"
    assert {a.model: a.delta_points for a in report.ablation}["full"] == 0.0
    # every fine-tuning part keeps its dev predictions, which reproduce its accuracy; the ablation's
    # paired errors come from them
    gold = downstream.class_indices(downstream.load_task(task.spec), split["dev"])
    for r in task.results:
        for x in r.seeds:
            part = json.loads((report_dir / "parts" / "task" / task.name / r.model / f"seed{x.seed}.json").read_text())
            preds = part["data"]["dev_predictions"]
            assert len(preds) == task.split.dev
            assert sum(p == g for p, g in zip(preds, gold)) / len(gold) == pytest.approx(x.accuracy)
    se = {a.model: a.delta_se_points for a in report.ablation}
    assert se["teacher"] is None and se["full"] is None
    assert all(se[s] is not None and se[s] >= 0 for s in STUDENTS if s != "full")


def test_masked_logits_equal_the_full_head(teacher_model: torch.nn.Module) -> None:
    from kdpipe.pipeline.mlm_eval import masked_logits

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (2, 12), generator=g)
    att = torch.ones_like(ids)
    att[1, 9:] = 0
    sel = torch.zeros_like(ids, dtype=torch.bool)
    sel[0, [1, 4]] = True
    sel[1, 3] = True
    got = masked_logits(teacher_model, ids, att, sel, torch.device("cpu"))
    with torch.inference_mode():
        ref = teacher_model(input_ids=ids, attention_mask=att).logits[sel]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_heldout_labels_line_up_with_masked_positions(tmp_path: Path, tokenizer, teacher_model) -> None:
    """masked_logits returns rows in row-major (b, t) order: the labels must come in that order."""
    from kdpipe.pipeline import corpus
    from kdpipe.pipeline.masking import MaskingSpec
    from kdpipe.pipeline.mlm_eval import Heldout, heldout_batches

    held = tiny_corpus(tmp_path / "held.txt", lines=20, seed=3)
    h = Heldout((str(held),), sequences=12, seq_len=16, masking=MaskingSpec(mask_prob=0.3), batch_size=5)
    vocab = teacher_model.config.vocab_size
    batches, n_seq, _ = heldout_batches(h, corpus.resolve_corpus(h.sources), tokenizer, vocab)
    again, _, _ = heldout_batches(h, corpus.resolve_corpus(h.sources), tokenizer, vocab)
    unmasked = [torch.from_numpy(s) for s in itertools.islice(
        corpus.iter_sequences(corpus.resolve_corpus(h.sources), tokenizer, 16, "pack"), 12)]
    assert n_seq == 12 and sum(len(b[0]) for b in batches) == 12
    originals = {tuple(s.tolist()) for s in unmasked}
    for (ids, att, sel, labels), (ids2, *_, labels2) in zip(batches, again, strict=True):
        assert torch.equal(ids, ids2) and torch.equal(labels, labels2)  # the same masks every time
        assert labels.numel() == int(sel.sum()) and not (sel & ~att.bool()).any()
        for row in range(len(ids)):  # putting the labels back gives an original sequence
            restored = ids[row].clone()
            restored[sel[row]] = labels[int(sel[:row].sum()):int(sel[:row + 1].sum())]
            assert tuple(restored[att[row].bool()].tolist()) in originals


def test_a_student_head_that_is_not_linear_is_named(teacher_model: torch.nn.Module) -> None:
    from kdpipe.pipeline.errors import KdpipeError
    from kdpipe.pipeline.mlm_eval import masked_logits

    class NoDecoder(torch.nn.Module):
        def get_output_embeddings(self) -> None:
            return None

    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(KdpipeError, match="^student small's output layer is NoneType"):
        masked_logits(NoDecoder(), ids, ids, ids.bool(), torch.device("cpu"), "student small")


# ---------------------------------------------------------------------------------------- resume

def test_rerun_recomputes_only_missing_parts(tmp_path: Path, work: Path, teacher_dir: Path,
                                             report_dir: Path) -> None:
    out = Path(shutil.copytree(report_dir, tmp_path / "report"))
    gone = ["parts/task/task/no-ce/seed1.json", "parts/mlm/full.json"]
    for g in gone:
        (out / g).unlink()
    before = parts_mtimes(out)
    time.sleep(0.01)
    summary = ok(kdpipe(*base_args(work, teacher_dir, out)))
    assert summary["computed"] == 2 and summary["reused"] == 8 and summary["resumed"]
    after = parts_mtimes(out)
    assert {k for k in after if k not in before} == set(gone)
    assert all(after[k] == v for k, v in before.items())  # nothing finished was redone
    old = json.loads((report_dir / gone[0]).read_text())["data"]
    new = json.loads((out / gone[0]).read_text())["data"]
    assert {k: v for k, v in old.items() if k != "train_seconds"} == \
        {k: v for k, v in new.items() if k != "train_seconds"}  # and the redone seed is the same


def test_more_seeds_reuse_the_seeds_done(tmp_path: Path, work: Path, teacher_dir: Path,
                                         report_dir: Path) -> None:
    out = Path(shutil.copytree(report_dir, tmp_path / "report"))
    before = parts_mtimes(out)
    summary = ok(kdpipe(*base_args(work, teacher_dir, out), "--seeds", "3"))
    assert summary["computed"] == 3 and summary["reused"] == 10
    assert all(parts_mtimes(out)[k] == v for k, v in before.items())
    report = Report.model_validate_json((out / "report.json").read_text())
    assert all(len(r.seeds) == 3 for r in report.tasks[0].results)


def test_other_settings_are_refused_naming_the_difference(tmp_path: Path, work: Path,
                                                          teacher_dir: Path, report_dir: Path) -> None:
    out = Path(shutil.copytree(report_dir, tmp_path / "report"))
    before = parts_mtimes(out)
    one_line_error(kdpipe(*base_args(work, teacher_dir, out), "--epochs", "2"),
                   "other settings", "downstream.epochs: 1 → 2")
    assert parts_mtimes(out) == before


def test_killed_eval_resumes_without_redoing_finished_seeds(tmp_path: Path, work: Path, teacher_dir: Path,
                                                            kdpipe_popen) -> None:
    out = tmp_path / "report"
    args = ["--teacher", teacher_dir, "--student", work / "full", "--student", work / "no-ce",
            "--task", work / "task.jsonl", "--out", out, "--no-speed", "--seeds", "4",
            "--epochs", "2", "--batch-size", "4"]
    proc = kdpipe_popen("eval", *args)
    deadline = time.monotonic() + 90
    while not list((out / "parts").rglob("seed*.json")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no part appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_mid_way = not (out / "report.json").exists()
    before = parts_mtimes(out)
    assert before, "the killed run left no finished part"
    summary = ok(kdpipe(*args))
    after = parts_mtimes(out)
    assert len(after) == 12 and all(after[k] == v for k, v in before.items())
    assert summary["reused"] == len(before) and summary["computed"] == 12 - len(before)
    assert not list(out.rglob("*.tmp"))
    if not killed_mid_way:
        pytest.skip("the eval finished before the kill; resume was checked on a complete run only")


# ------------------------------------------------------------------------------------ bad inputs

def test_plain_model_folder_as_named_student(work: Path, teacher_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    ok(kdpipe("--teacher", teacher_dir, "--student", f"small={work / 'full' / 'final'}",
              "--student", f"plain={teacher_dir}", "--heldout", work / "heldout.txt", "--out", out,
              "--no-speed", "--seq-len", "32", "--heldout-sequences", "8"))
    report = Report.model_validate_json((out / "report.json").read_text())
    assert report.students == ["small", "plain"]
    plain = next(r for r in report.mlm.results if r.model == "plain")
    assert plain.teacher_agreement == 1.0 and plain.kl_teacher_student == pytest.approx(0, abs=1e-9)
    # a run's final/ given directly still finds its run directory and metrics
    assert next(m for m in report.models if m.name == "small").metrics_file
    assert "training_curves.png" in report.plots and "retention.png" not in report.plots


def test_student_run_without_final_model(work: Path, teacher_dir: Path, tmp_path: Path,
                                         kdpipe_cli, one_line_error) -> None:
    run = make_student(tmp_path, teacher_dir, "unfinished", seed=3, final=False)
    proc = kdpipe_cli("eval", "--teacher", teacher_dir, "--student", run, "--out", tmp_path / "r",
                      check=False)
    one_line_error(proc, "student run", "has no final model", "final/config.json")  # the real CLI
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("case", ["no-columns", "one-class", "no-heldout", "no-student", "same-name"])
def test_bad_inputs_give_one_line_errors(case: str, work: Path, teacher_dir: Path, tmp_path: Path) -> None:
    args: list = ["--teacher", teacher_dir, "--student", work / "full", "--out", tmp_path / "r", "--no-speed"]
    if case == "no-columns":
        (tmp_path / "t.jsonl").write_text('{"sentence": "the film", "y": "pos"}\n' * 3)
        needles = ("no column 'text'", "--text-column")
        args += ["--task", tmp_path / "t.jsonl"]
    elif case == "one-class":
        args += ["--task", write_task(tmp_path / "t.jsonl", labels=("pos",))]
        needles = ("single label", "at least two classes")
    elif case == "no-heldout":
        args += ["--heldout", tmp_path / "missing.txt"]
        needles = ("held-out file", "missing.txt", "does not exist")
    elif case == "no-student":
        args += ["--student", tmp_path / "nowhere"]
        needles = ("student", "nowhere", "does not exist")
    else:
        args += ["--student", work / "full"]
        needles = ("two models are named 'full'", "NAME=PATH")
    one_line_error(kdpipe(*args), *needles)
    assert not (tmp_path / "r").exists()  # nothing is written before every input checks out


def test_heldout_text_the_student_was_distilled_on_is_flagged(work: Path, teacher_dir: Path,
                                                              tmp_path: Path) -> None:
    from kdpipe.pipeline.fsutil import sha256_file

    cache = tmp_path / "cache"
    cache.mkdir()
    held = work / "heldout.txt"
    (cache / "fingerprint.json").write_text(json.dumps(
        {"corpus": {"files": [{"name": "wiki.txt", "sha256": sha256_file(held)}]}}))
    run = make_student(tmp_path, teacher_dir, "leaky", seed=4, metrics=False)
    (run / "run.json").write_text(json.dumps({"cache": str(cache)}))
    out = tmp_path / "r"
    ok(kdpipe("--teacher", teacher_dir, "--student", run, "--heldout", held, "--out", out,
              "--no-speed", "--seq-len", "32", "--heldout-sequences", "4"))
    report = Report.model_validate_json((out / "report.json").read_text())
    assert len(report.warnings) == 1 and "student leaky was distilled" in report.warnings[0]
    assert "> **Warnings**" in (out / "report.md").read_text()


# ------------------------------------------------------------------------------------------ sweep

SWEEP = ("--sweep-lr", "3e-4,3e-3", "--sweep-epochs", "1,2", "--tune-fraction", "0.25")


def sweep_args(work: Path, teacher_dir: Path, out: Path) -> list[str | Path]:
    return ["--teacher", teacher_dir, "--student", work / "full", "--student", work / "no-ce",
            "--task", work / "task.jsonl", "--out", out, "--no-speed", "--seeds", "2",
            "--batch-size", "8", "--max-train-examples", "40", "--group-by-length", *SWEEP]


@pytest.fixture(scope="module")
def sweep_dir(work: Path, teacher_dir: Path) -> Path:
    out = work / "sweep-report"
    summary = ok(kdpipe(*sweep_args(work, teacher_dir, out)))
    # 3 models x 2 rates (each scored after 1 and 2 epochs), then 3 models x 2 seeds
    assert summary["computed"] == 6 + 6 and summary["reused"] == 0
    return out


def test_sweep_chooses_per_model_on_the_tuning_split_and_reports_it(sweep_dir: Path) -> None:
    report = Report.model_validate_json((sweep_dir / "report.json").read_text())
    (task,) = report.tasks
    split = json.loads((sweep_dir / task.split.file).read_text())
    tune, train, dev = set(split["tune"]), set(split["train"]), set(split["dev"])
    assert len(tune) == task.split.tune == 10 and tune < train and not tune & dev  # never the dev split
    sw = task.recipe["sweep"]
    assert (sw["lr"], sw["epochs"], sw["tune_examples"], sw["fit_examples"]) == ([3e-4, 3e-3], [1, 2], 10, 30)
    for r in task.results:
        assert {(p.lr, p.epochs) for p in r.sweep} == {(3e-4, 1), (3e-4, 2), (3e-3, 1), (3e-3, 2)}
        best = downstream.choose(list(r.sweep))
        assert (r.lr, r.epochs, r.schedule_epochs) == (best.lr, best.epochs, 2)
        for x in r.seeds:  # the final fine-tunings ran with the choice, on all 40 training examples
            part = json.loads((sweep_dir / "parts" / "task" / task.name / r.model / f"seed{x.seed}.json").read_text())
            assert (part["data"]["lr"], part["data"]["epochs"]) == (best.lr, best.epochs)
            assert x.steps == 5 * best.epochs  # ceil(40 / 8) per epoch
        for p in r.sweep:  # each point is the part's tuning score
            part = json.loads((sweep_dir / "parts" / "sweep" / task.name / r.model / f"lr{p.lr:g}" /
                               "seed0.json").read_text())["data"]
            assert part["scores"][str(p.epochs)]["accuracy"] == p.accuracy
            assert (part["fit_examples"], part["tune_examples"], part["steps"]) == (30, 10, 2 * 4)
    assert task.recipe["group_by_length"] is True
    md = (sweep_dir / "report.md").read_text()
    assert "Recipe chosen per model by a sweep" in md and "never the dev split" in md
    assert "batch 8 (grouped by length)" in md
    assert "Tuning-split accuracy % of each sweep point" in md and md.count("**") >= 2 * 3


def test_sweep_resumes_without_redoing_finished_parts(tmp_path: Path, work: Path, teacher_dir: Path,
                                                     sweep_dir: Path) -> None:
    out = Path(shutil.copytree(sweep_dir, tmp_path / "report"))
    before = parts_mtimes(out)
    summary = ok(kdpipe(*sweep_args(work, teacher_dir, out)))
    assert summary["computed"] == 0 and summary["reused"] == 12 and parts_mtimes(out) == before
    gone = "parts/sweep/task/no-ce/lr0.003/seed0.json"
    old = json.loads((out / gone).read_text())["data"]
    (out / gone).unlink()
    summary = ok(kdpipe(*sweep_args(work, teacher_dir, out)))
    assert summary["computed"] == 1 and summary["reused"] == 11  # the choice is the same, so no final redone
    new = json.loads((out / gone).read_text())["data"]
    assert old["scores"] == new["scores"]
    one_line_error(kdpipe(*sweep_args(work, teacher_dir, out)[:-2], "--tune-fraction", "0.5"),
                   "other settings", "sweep.tune_fraction: 0.25 → 0.5")


def test_settings_added_later_are_recorded_only_when_used(sweep_dir: Path, report_dir: Path) -> None:
    """So a report directory made before them resumes (its eval.json lacks them)."""
    used = json.loads((sweep_dir / "eval.json").read_text())["settings"]
    plain = json.loads((report_dir / "eval.json").read_text())["settings"]
    assert used["downstream"]["group_by_length"] is True and used["sweep"]["sweep_epochs"] == [1, 2]
    assert "group_by_length" not in plain["downstream"] and "sweep" not in plain


def test_a_student_distilled_on_the_task_is_fine_tuned_against_the_teacher(
        tmp_path: Path, work: Path, teacher_dir: Path, sweep_dir: Path) -> None:
    """`--task-distill NAME`: that student's sweep and fine-tunes use the teacher's logits (its sweep
    the teacher's fine-tuned on the fit examples alone), on the training examples and a transfer
    set of unlabelled ones; every other fine-tune is what it is without the option, bit for bit."""
    out = tmp_path / "td"
    args = [*sweep_args(work, teacher_dir, out), "--student", f"full-td={work / 'full'}",
            "--task-distill-transfer", "10", "--task-distill", "full-td", "--task-distill-alpha", "0.7"]
    summary = ok(kdpipe(*args))
    assert summary["computed"] == 4 * 2 + 1 + 4 * 2  # 4 models x 2 rates, the soft labels, 4 models x 2 seeds
    report = Report.model_validate_json((out / "report.json").read_text())
    (task,) = report.tasks
    by = {r.model: r for r in task.results}
    assert by["full-td"].task_distill == {"alpha": 0.7, "temperature": 2.0}
    assert all(by[n].task_distill is None for n in (report.teacher, "full", "no-ce"))
    part = lambda root, *key: json.loads((root / "parts" / Path(*key)).with_suffix(".json").read_text())["data"]  # noqa: E731
    for n in (report.teacher, "full", "no-ce"):
        for seed in (0, 1):
            a, b = part(out, "task", task.name, n, f"seed{seed}"), part(sweep_dir, "task", task.name, n, f"seed{seed}")
            assert {k: v for k, v in a.items() if k not in ("train_seconds", "train_logits")} == \
                {k: v for k, v in b.items() if k != "train_seconds"}
            assert ("train_logits" in a) == (n == report.teacher)
        assert by[n].sweep == next(r for r in Report.model_validate_json(
            (sweep_dir / "report.json").read_text()).tasks[0].results if r.model == n).sweep
    # the transfer set: 10 training-pool examples after the 40 fine-tuned on, never dev
    split = json.loads((out / task.split.file).read_text())
    transfer = split["transfer"]
    assert len(transfer) == task.split.transfer == 10 and not set(transfer) & (set(split["train"]) | set(split["dev"]))
    assert task.split.transfer_indices_sha256 == downstream.indices_sha(transfer)
    teacher = part(out, "task", task.name, report.teacher, "seed0")
    assert torch.tensor(teacher["train_logits"]).shape == (40 + 10, 2)
    # the sweep's soft labels: the teacher at its chosen point, fine-tuned on the 30 fit examples
    soft = part(out, "soft", task.name, "seed0")
    best = downstream.choose(list(by[report.teacher].sweep))
    assert (soft["lr"], soft["epochs"], len(soft["train_logits"])) == (best.lr, best.epochs, 30 + 10)
    assert soft["accuracy"] == best.accuracy  # the same run as the sweep's, scored on the tuning split
    for lr in (3e-4, 3e-3):
        assert part(out, "sweep", task.name, "full-td", f"lr{lr:g}", "seed0")["task_distill"] == \
            {"alpha": 0.7, "temperature": 2.0}
    td = part(out, "task", task.name, "full-td", "seed1")
    assert td["task_distill"]["alpha"] == 0.7 and td["steps"] == 7 * td["epochs"]  # ceil(50 / 8) per epoch
    md = (out / "report.md").read_text()
    assert "| full-td † |" in md and "Distilled on the task (marked †): full-td" in md
    assert "logits alone of 10 more examples of the training pool" in md
    assert "† Distilled on the tasks as well" in md and md.count("| full-td † |") == 2  # task and ablation tables
    settings = json.loads((out / "eval.json").read_text())["settings"]["downstream"]["task_distill"]
    assert settings == {"students": ["full-td"], "alpha": 0.7, "temperature": 2.0, "transfer": 10}
    assert ok(kdpipe(*args))["computed"] == 0  # resumes
    one_line_error(kdpipe(*args[:-2]), "other settings",
                   "task_distill.alpha: 0.7 → 0.5")


def test_augmented_copies_top_the_transfer_set_up(tmp_path: Path, work: Path, teacher_dir: Path) -> None:
    """`--task-distill-augment`: where the training pool has fewer than --task-distill-transfer
    examples left, augmented copies of the training examples fill the transfer set, made once by
    the teacher's masked LM; the sweep leaves out the copies of its tuning examples."""
    out = tmp_path / "aug"
    args = ["--teacher", teacher_dir, "--student", f"td={work / 'full'}", "--task", work / "task.jsonl",
            "--out", out, "--no-speed", "--seeds", "1", "--batch-size", "8", "--max-train-examples", "40", *SWEEP,
            "--task-distill", "td", "--task-distill-transfer", "30", "--task-distill-augment"]
    summary = ok(kdpipe(*args))
    assert summary["computed"] == 1 + 2 * 2 + 1 + 2  # the copies, 2 models x 2 rates, the soft labels, 2 fine-tunes
    report = Report.model_validate_json((out / "report.json").read_text())
    (task,) = report.tasks
    assert (task.split.transfer, task.split.augmented) == (14, 16)  # the pool has 14 left after the 40
    split = json.loads((out / task.split.file).read_text())
    part = lambda *key: json.loads((out / "parts" / Path(*key)).with_suffix(".json").read_text())["data"]  # noqa: E731
    copies = part("augment", task.name)
    assert copies["sources"] == split["train"][:16] and len(copies["texts"]) == 16
    texts = [json.loads(line)["text"] for line in (work / "task.jsonl").read_text().splitlines()]
    assert sum(t != texts[i] for t, i in zip(copies["texts"], copies["sources"])) >= 12  # re-guessed pieces
    assert len(part("task", task.name, report.teacher, "seed0")["train_logits"]) == 40 + 30
    tune = set(split["tune"])
    kept = sum(src not in tune for src in copies["sources"])
    assert 0 < kept < 16  # some copies are of tuning examples: the sweep leaves them out
    assert len(part("soft", task.name, "seed0")["train_logits"]) == 40 - len(tune) + 14 + kept
    assert "16 augmented copies of the training examples" in (out / "report.md").read_text()
    settings = json.loads((out / "eval.json").read_text())["settings"]["downstream"]["task_distill"]
    assert settings["augment"] is True and settings["transfer"] == 30
    assert ok(kdpipe(*args))["computed"] == 0  # resumes, the copies included
    one_line_error(kdpipe(*args[:-3], "--task-distill-augment"), "--task-distill-augment", "--task-distill-transfer")
    one_line_error(kdpipe(*args[:-2], "1000000", "--task-distill-augment"), "at most 20 copies")


def test_a_run_named_twice_gets_its_first_names_model_card(tmp_path: Path, work: Path, teacher_dir: Path) -> None:
    run = Path(shutil.copytree(work / "full", tmp_path / "run"))
    card = run / "final" / "README.md"
    card.write_text("# student\n<!-- kdpipe:eval -->\n<!-- /kdpipe:eval -->\n")
    out = ok(kdpipe("--teacher", teacher_dir, "--student", f"plain={run}", "--student", f"td={run}",
                    "--task-distill", "td", "--task", work / "task.jsonl", "--out", tmp_path / "r", "--no-speed",
                    "--seeds", "1", "--epochs", "1", "--batch-size", "8", "--max-train-examples", "20"))
    assert out["model_cards"] == [str(card)]  # once, not overwritten by the second name
    from kdpipe.pipeline import model_card

    report = Report.model_validate_json((tmp_path / "r" / "report.json").read_text())
    assert model_card.eval_section(report, "plain", str(tmp_path / "r")) in card.read_text()


def test_task_distill_names_students_of_a_run_with_a_task(work: Path, teacher_dir: Path, tmp_path: Path) -> None:
    args = sweep_args(work, teacher_dir, tmp_path / "r")
    one_line_error(kdpipe(*args, "--task-distill", "nobody"), "'nobody' is not a student", "full, no-ce")
    no_task = [a for a in args if a != work / "task.jsonl" and a != "--task"]
    one_line_error(kdpipe(*no_task, "--task-distill", "full"), "--task-distill needs a downstream task")
    one_line_error(kdpipe(*args, "--task-distill", "full", "--task-distill-alpha", "0"), "task_distill_alpha")
    one_line_error(kdpipe(*args, "--task-distill-transfer", "5"), "--task-distill-transfer", "name them")
    one_line_error(kdpipe(*args, "--task-distill", "full", "--task-distill-transfer", "-1"), "task_distill_transfer")
    assert not (tmp_path / "r").exists()


def test_sweep_grid_must_be_positive_and_distinct(work: Path, teacher_dir: Path, tmp_path: Path) -> None:
    args = sweep_args(work, teacher_dir, tmp_path / "r")[:-6]
    one_line_error(kdpipe(*args, "--sweep-lr", "1e-4,1e-4"), "sweep_lr", "distinct")
    one_line_error(kdpipe(*args, "--sweep-epochs", "0,2"), "sweep_epochs", "positive")
    assert not (tmp_path / "r").exists()
