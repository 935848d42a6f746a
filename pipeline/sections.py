"""The sections of an eval report, from the data of its finished parts.

Pure functions: measurements in (the `data` of parts/*.json), `schemas.report` sections out,
with the medians over repeats or seeds and each student's retention of the teacher's score.
Models are listed teacher first, as given.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from kdpipe.pipeline import downstream, metrics, speed
from kdpipe.pipeline.mlm_eval import Heldout
from kdpipe.schemas.report import (
    AblationRow, MlmResult, MlmSection, SeedScore, SpeedResult, SpeedSection, Spread, SweepPoint,
    TaskModelResult, TaskSection, TaskSplit,
)


def spread(values: list[float]) -> Spread:
    sp = metrics.median_spread(values)
    return Spread(median=sp.median, min=sp.min, max=sp.max, values=sp.values)


def speed_section(data: dict[str, Any], models: list[str], bench: speed.Bench) -> SpeedSection:
    """`models` teacher first; speed-ups are relative to the teacher's medians."""
    lat = {n: spread(v) for n, v in data["latency_ms"].items()}
    thr = {n: spread(v) for n, v in data["throughput"].items()}
    t = models[0]
    results = [SpeedResult(model=n, latency_ms=lat[n], throughput=thr[n],
                           latency_speedup=metrics.speedup(lat[n].median, lat[t].median),
                           throughput_speedup=metrics.speedup(1 / thr[n].median, 1 / thr[t].median))
               for n in models]
    return SpeedSection(device=data["device"], torch_threads=data["torch_threads"], what=speed.WHAT,
                        seq_len=bench.seq_len, batch_size=bench.batch_size, repeats=bench.repeats,
                        warmup=bench.warmup, results=results)


def mlm_section(parts: dict[str, dict[str, Any]], heldout: Heldout,
                fingerprint: dict[str, Any]) -> MlmSection:
    """`parts`: model name -> its masked-LM part data, teacher first."""
    fields = set(MlmResult.model_fields)
    results = [MlmResult(**{k: v for k, v in d.items() if k in fields}) for d in parts.values()]
    teacher, *students = parts
    t = parts[teacher]
    m = heldout.masking
    return MlmSection(
        heldout=fingerprint, sequences=t["sequences"], tokens=t["tokens"], seq_len=heldout.seq_len,
        packing=heldout.packing,
        masking={"mask_prob": m.mask_prob, "mask_token_prob": m.mask_token_prob,
                 "random_token_prob": m.random_token_prob, "seed": m.seed, "view": 0},
        results=results,
        top1_retention={n: metrics.retention(parts[n]["top1_accuracy"], t["top1_accuracy"])
                        for n in students})


@dataclass(frozen=True)
class Sweep:
    """The grid a sweep tried per model, and how it was scored."""

    lrs: list[float]
    epochs: list[int]
    tune_fraction: float
    seeds: int


SWEEP_RULE = ("highest tuning accuracy (mean over the sweep seeds), then macro-F1; ties to fewer "
              "epochs, then the lower rate")


def task_section(task: downstream.Task, split: downstream.Split, split_file: str,
                 recipe: downstream.Recipe, scores: dict[str, list[dict[str, Any]]],
                 sweep: Sweep | None = None, tune: list[int] | None = None,
                 points: dict[str, list[SweepPoint]] | None = None) -> TaskSection:
    """`scores`: model name -> its task part data seed by seed, teacher first; with a sweep, `tune`
    is the tuning split and `points` each model's scored grid."""
    per_model = {n: [SeedScore(**{k: v for k, v in d.items() if k in SeedScore.model_fields})
                     for d in seeds] for n, seeds in scores.items()}
    acc = {n: spread([x.accuracy for x in v]) for n, v in per_model.items()}
    f1 = {n: spread([x.macro_f1 for x in v]) for n, v in per_model.items()}
    t = next(iter(per_model))
    kept = lambda sp, n: None if n == t else metrics.retention(sp[n].median, sp[t].median)  # noqa: E731

    def used(n: str) -> dict[str, Any]:  # what the model's parts were fine-tuned with
        d = scores[n][0]
        return {"lr": d.get("lr", recipe.lr), "epochs": d.get("epochs", recipe.epochs),
                "schedule_epochs": d.get("schedule_epochs", recipe.horizon),
                "task_distill": d.get("task_distill")}

    results = [TaskModelResult(model=n, seeds=v, accuracy=acc[n], macro_f1=f1[n],
                               accuracy_retention=kept(acc, n), macro_f1_retention=kept(f1, n),
                               **used(n), sweep=list((points or {}).get(n, [])))
               for n, v in per_model.items()]
    seeds = [x.seed for x in per_model[t]]
    record = split.record(len(task.texts), split_file)
    sweep_record = None
    if sweep is not None and tune is not None:
        record.update(tune=len(tune), tune_indices_sha256=downstream.indices_sha(tune))
        sweep_record = {"lr": sweep.lrs, "epochs": sweep.epochs, "tune_fraction": sweep.tune_fraction,
                        "seeds": list(range(sweep.seeds)), "tune_examples": len(tune),
                        "fit_examples": len(split.train) - len(tune), "rule": SWEEP_RULE}
    return TaskSection(
        name=task.name, spec=task.spec, fingerprint=task.fingerprint, text_column=task.text_column,
        label_column=task.label_column, labels=task.label_names, label_counts=task.label_counts(),
        dropped_rows=task.dropped, split=TaskSplit(**record),
        recipe={**recipe.__dict__, "seeds": seeds, "optimizer": "AdamW",
                "schedule": "linear warm-up, linear decay", "grad_clip": 1.0,
                "model": "AutoModelForSequenceClassification", "sweep": sweep_record},
        results=results)


def ablation(tasks: list[TaskSection], models: list[str], baseline: str,
             predictions: dict[str, dict[str, list[list[int] | None]]],
             gold: dict[str, list[int]]) -> list[AblationRow]:
    """The paper's Table 4: each model's mean over tasks of its median accuracy, its change from
    the baseline student in points with that change's paired standard error, and its retention of
    the teacher's (`models` teacher first). `predictions`: task -> model -> dev predictions per
    seed (None for a part written before predictions were kept); `gold`: task -> dev classes."""
    macro = {n: statistics.fmean(next(r.accuracy.median for r in t.results if r.model == n)
                                 for t in tasks) for n in models}
    t = models[0]

    def delta_se(n: str) -> float | None:  # the macro's: the tasks' errors combined, / tasks
        if n in (t, baseline):
            return None
        runs = [(predictions[k.name][n], predictions[k.name][baseline], gold[k.name]) for k in tasks]
        if any(None in a or None in b for a, b, _ in runs):
            return None
        return 100 * math.sqrt(sum(metrics.paired_delta_se(a, b, g) ** 2 for a, b, g in runs)) / len(tasks)

    return [AblationRow(model=n, macro_accuracy=macro[n],
                        delta_points=None if n == t else 100 * (macro[n] - macro[baseline]),
                        delta_se_points=delta_se(n), retention=metrics.retention(macro[n], macro[t]))
            for n in models]
