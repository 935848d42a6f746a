"""What `kdpipe eval` shows a person: report.md tables, PNG plots and the CLI's headline numbers,
from a validated Report.

Pure rendering: every function takes the report (and, for the curves, the students' metrics) and
returns text, PNG bytes or a small dict; the stage writes them atomically. matplotlib runs on the
Agg backend.

Plots
  training_curves.png  one panel per loss term (loss, loss_ce, loss_mlm, loss_cos) against step,
                       one line per student, so an ablation's missing term shows at a glance
  retention.png        per task (and their mean), each student's median accuracy and macro-F1 as
                       % of the teacher's, with the min-max over seeds as error bars
  tradeoff.png         what was kept against what was gained: retention vs speed-up, marker
                       area ~ parameters
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from kdpipe.schemas.report import CURVES_NAME, RETENTION_NAME, TRADEOFF_NAME, Report, TaskSection

LOSS_TERMS = (("loss", "total loss"), ("loss_ce", "L_ce (soft targets)"),
              ("loss_mlm", "L_mlm (masked LM)"), ("loss_cos", "L_cos (hidden states)"))
_MAX_POINTS = 2000


# --------------------------------------------------------------------------------- formatting


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}"


def count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def mbytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def times(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def spread_pct(s: Any) -> str:
    if len(s.values) == 1:
        return pct(s.median)
    return f"{pct(s.median)} ({pct(s.min)}–{pct(s.max)})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A GitHub markdown table; `align` has one of l/r per column (default: first l, rest r)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- markdown


def _task_result(task: TaskSection, model: str) -> Any:
    return next((r for r in task.results if r.model == model), None)


def summary_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """One row per model: size, speed, masked-LM and each task's accuracy with its retention."""
    header = ["model", "params", "weights"]
    speed = {r.model: r for r in report.speed.results} if report.speed else {}
    mlm = {r.model: r for r in report.mlm.results} if report.mlm else {}
    if speed:
        header += ["latency b=1", "speed-up"]
    if mlm:
        header += ["MLM top-1 %", "agreement %"]
    for t in report.tasks:
        header += [f"{t.name} acc %", f"{t.name} % of teacher"]
    if len(report.tasks) > 1:
        header.append("mean % of teacher")
    rows = []
    for m in report.models:
        row = [m.name + (" (teacher)" if m.role == "teacher" and m.name != "teacher" else ""),
               count(m.parameters),
               mbytes(m.weights_bytes)]
        if speed:
            s = speed.get(m.name)
            row += [f"{s.latency_ms.median:.2f} ms" if s else "–", times(s.latency_speedup) if s else "–"]
        if mlm:
            r = mlm.get(m.name)
            row += [pct(r.top1_accuracy) if r else "–", pct(r.teacher_agreement) if r else "–"]
        kept = []
        for t in report.tasks:
            r = _task_result(t, m.name)
            row += [pct(r.accuracy.median) if r else "–", num(r.accuracy_retention, 1) if r else "–"]
            if r and r.accuracy_retention is not None:
                kept.append(r.accuracy_retention)
        if len(report.tasks) > 1:
            row.append(num(sum(kept) / len(kept), 1) if len(kept) == len(report.tasks) else "–")
        rows.append(row)
    return header, rows


def headline(report: Report) -> dict[str, Any]:
    """What the CLI prints beside the report's path: each student's accuracy retention per task
    (% of the teacher, one decimal) and batch-1 latency speed-up."""
    out: dict[str, Any] = {}
    for t in report.tasks:
        out[f"{t.name}_accuracy_retention"] = {r.model: None if r.accuracy_retention is None
                                               else round(r.accuracy_retention, 1)
                                               for r in t.results if r.model != report.teacher}
    if report.speed:
        out["latency_speedup"] = {r.model: round(r.latency_speedup, 2) for r in report.speed.results
                                  if r.model != report.teacher and r.latency_speedup}
    return out


def render_markdown(report: Report) -> str:
    prov = report.provenance
    cfg = prov.get("config", {})
    versions = prov.get("versions", {})
    out = ["# kdpipe evaluation report", ""]
    out.append(f"Teacher **{report.teacher}** and {len(report.students)} student(s): "
               + ", ".join(f"**{s}**" for s in report.students) + ".  ")
    out.append(f"Made {report.created_at} with kdpipe {versions.get('kdpipe', '?')} "
               f"(code {prov.get('code_revision', '?')}), torch {versions.get('torch', '?')}, "
               f"transformers {versions.get('transformers', '?')}"
               + (f", on {report.speed.device}" if report.speed else "") + ".")
    out.append("")
    if report.warnings:
        out += ["> **Warnings**", ">"] + [f"> - {w}" for w in report.warnings] + [""]

    out += ["## Summary", ""]
    header, rows = summary_rows(report)
    out += [table(header, rows), ""]
    out.append("Accuracies in %, downstream ones the median over fine-tuning seeds; "
               "\"% of teacher\" is the model's median as a share of the teacher's (the paper's "
               "\"97% of BERT\"). Speed-up is the teacher's batch-1 latency over the model's.")
    out.append("")

    if report.ablation:
        out += ["## Ablation (the paper's Table 4)", ""]
        base = report.baseline
        out.append(f"Macro score: mean over the {len(report.tasks)} task(s) of the median dev "
                   f"accuracy. Change in points against the baseline student **{base}**, with its "
                   "standard error paired over the same dev examples (per-example correctness "
                   "averaged over seeds): a change within about 2 s.e. of zero is not resolved.")
        out.append("")
        distilled = {r.model for t in report.tasks for r in t.results if r.task_distill}
        if distilled:
            out.append("† Distilled on the tasks as well: fine-tuned against the fine-tuned teacher too "
                       "(each task's section says how).")
            out.append("")
        out.append(table(["model", "macro accuracy %", f"Δ vs {base} (points)", "± s.e.", "% of teacher"],
                         [[a.model + (" †" if a.model in distilled else ""), pct(a.macro_accuracy, 2),
                           "–" if a.delta_points is None else f"{a.delta_points:+.2f}",
                           "–" if a.delta_se_points is None else f"{a.delta_se_points:.2f}",
                           num(a.retention, 1)] for a in report.ablation]))
        out.append("")

    if report.mlm:
        m = report.mlm
        held = m.heldout
        files = ", ".join(f.get("name", "?") for f in held.get("files", [])) or held.get("name", "?")
        mk = m.masking
        out += ["## Masked LM on held-out text", ""]
        out.append(f"{m.sequences} sequences of at most {m.seq_len} tokens ({m.packing}), "
                   f"{m.tokens} tokens from {files}; {m.results[0].masked_tokens if m.results else 0} "
                   f"masked positions ({mk['mask_prob']:.0%} of tokens, {mk['mask_token_prob']:.0%} "
                   f"[MASK] / {mk['random_token_prob']:.0%} random / rest unchanged, seed "
                   f"{mk['seed']}). Every model sees the same masked input.")
        out.append("")
        rows = []
        for r in m.results:
            rows.append([r.model, pct(r.top1_accuracy), pct(r.top5_accuracy), num(r.perplexity, 2),
                         num(m.top1_retention.get(r.model), 1), pct(r.teacher_agreement),
                         num(r.kl_teacher_student, 4)])
        out.append(table(["model", "top-1 %", "top-5 %", "perplexity", "top-1 % of teacher",
                          "agreement %", "KL(teacher‖model)"], rows))
        out.append("")
        out.append("Agreement: the model's top-1 token equals the teacher's. KL at T = 1 in nats "
                   "per masked position; perplexity is exp of the mean cross-entropy there.")
        out.append("")

    for t in report.tasks:
        sp = t.split
        out += [f"## Downstream: {t.name}", ""]
        labels = ", ".join(f"{k} {v}" for k, v in t.label_counts.items())
        out.append(f"`{t.spec}`: {sp.examples} examples ({labels})"
                   + (f", {t.dropped_rows} rows without text or label dropped" if t.dropped_rows else "")
                   + ".  ")
        out.append(f"Split {sp.method} seed {sp.seed}, dev fraction {sp.dev_fraction}: fine-tuned on "
                   f"{sp.train} of {sp.train_pool} train examples, scored on {sp.dev} of "
                   f"{sp.dev_pool} dev examples (indices in `{sp.file}`, dev SHA-256 "
                   f"`{sp.dev_indices_sha256[:12]}`).  ")
        r = t.recipe
        sw = r.get("sweep")
        rest = (f"batch {r['batch_size']}" + (" (grouped by length)" if r.get("group_by_length") else "")
                + f", max length {r['max_length']}, weight decay "
                f"{r['weight_decay']}, warm-up {r['warmup_ratio']}; seeds {', '.join(map(str, r['seeds']))}.")
        if sw:
            out.append(f"Recipe chosen per model by a sweep: lr in {{{', '.join(f'{x:g}' for x in sw['lr'])}}} "
                       f"× epochs in {{{', '.join(map(str, sw['epochs']))}}}, each fine-tuned on "
                       f"{sw['fit_examples']} of the training examples and scored on the other "
                       f"{sw['tune_examples']} (the tuning split, never the dev split; seed(s) "
                       f"{', '.join(map(str, sw['seeds']))}). Chosen: {sw['rule']}. Each model is then "
                       f"fine-tuned on all {sp.train} training examples at its chosen lr, stopped after "
                       f"its chosen epochs of a schedule spanning {max(sw['epochs'])}; " + rest)
        else:
            out.append(f"Recipe: lr {r['lr']}, {r['epochs']} epoch(s), " + rest)
        distilled = [x for x in t.results if x.task_distill]
        if distilled:
            d = distilled[0].task_distill
            out.append(f"Distilled on the task (marked †): {', '.join(x.model for x in distilled)}, fine-tuned "
                       f"against (1 − {d['alpha']:g}) · CE(labels) + {d['alpha']:g} · T² · KL(teacher ‖ student) at "
                       f"T = {d['temperature']:g}, the teacher being the one fine-tuned with the same seed on the "
                       "same examples (in the sweep: on its fit examples alone)"
                       + (f", and on the teacher's logits alone of {sp.transfer} more examples of the training "
                          "pool whose labels are never used (the transfer set)" if sp.transfer else "")
                       + (f"{' and' if sp.transfer else ', and on the teacher’s logits alone of'} {sp.augmented} "
                          "augmented copies of the training examples (word pieces replaced by the pretrained "
                          "teacher's masked-LM guesses; in the sweep, none of the tuning examples')"
                          if sp.augmented else "") + ".")
        out.append("")
        rows = [[x.model + (" †" if x.task_distill else ""), spread_pct(x.accuracy), num(x.accuracy_retention, 1),
                 spread_pct(x.macro_f1),
                 num(x.macro_f1_retention, 1)] + ([f"{x.lr:g}", str(x.epochs)] if sw else [])
                for x in t.results]
        out.append(table(["model", "accuracy % median (min–max)", "% of teacher",
                          "macro-F1 % median (min–max)", "% of teacher"] + (["lr", "epochs"] if sw else []),
                         rows))
        out.append("")
        if sw:
            grid = [(lr, e) for lr in sw["lr"] for e in sw["epochs"]]
            rows = []
            for x in t.results:
                acc = {(p.lr, p.epochs): p.accuracy for p in x.sweep}
                rows.append([x.model] + [(f"**{pct(acc.get(g))}**" if g == (x.lr, x.epochs) else pct(acc.get(g)))
                                         for g in grid])
            out.append("Tuning-split accuracy % of each sweep point (the chosen one in bold):")
            out.append("")
            out.append(table(["model"] + [f"lr {lr:g}, {e} ep" for lr, e in grid], rows))
            out.append("")

    if report.speed:
        s = report.speed
        size = {m.name: m for m in report.models}
        out += ["## Size and speed", ""]
        out.append(f"{s.what}; {s.seq_len}-token sequences on {s.device} ({s.torch_threads} torch thread(s)), "
                   f"models interleaved, {s.warmup} warm-up call(s), median of {s.repeats} "
                   f"repeats (min–max in report.json).")
        out.append("")
        rows = []
        for r in s.results:
            m = size[r.model]
            rows.append([r.model, count(m.parameters), count(m.parameters_with_head),
                         str(m.layers or "–"), str(m.hidden_size or "–"), mbytes(m.weights_bytes),
                         f"{r.latency_ms.median:.2f}", times(r.latency_speedup),
                         f"{r.throughput.median:.1f}", times(r.throughput_speedup)])
        out.append(table(["model", "params (encoder)", "params (with MLM head)", "layers", "hidden",
                          "weights on disk", "latency ms (b=1)", "speed-up",
                          f"throughput seq/s (b={s.batch_size})", "speed-up"], rows))
        out.append("")

    if report.plots:
        out += ["## Plots", ""]
        titles = {CURVES_NAME: "Training curves", RETENTION_NAME: "Retention per task",
                  TRADEOFF_NAME: "What was kept vs speed"}
        for p in report.plots:
            out += [f"![{titles.get(p, p)}]({p})", ""]

    out += ["## Models", ""]
    out.append(table(["model", "role", "architecture", "path", "weights SHA-256"],
                     [[m.name, m.role, m.architecture or "–", f"`{m.path}`", f"`{m.weights_sha256[:16]}`"]
                      for m in report.models], "lllll"))
    out += ["", "## Settings", ""]
    skip = {"teacher", "students", "tasks", "heldout", "out"}
    out.append(", ".join(f"`{k}={v}`" for k, v in sorted(cfg.items()) if k not in skip))
    out.append("")
    out.append("Everything is in `report.json` (format kdpipe-eval-report v1); rerunning the same "
               "command reuses the finished parts in `parts/`.")
    return "\n".join(out) + "\n"


# -------------------------------------------------------------------------------------- plots


def plots(report: Report, curves: dict[str, list[dict[str, Any]]]) -> dict[str, bytes]:
    """File name -> PNG of every plot there is something to draw for, in the report's order."""
    pngs = {CURVES_NAME: plot_training_curves(curves), RETENTION_NAME: plot_retention(report),
            TRADEOFF_NAME: plot_tradeoff(report)}
    return {name: png for name, png in pngs.items() if png is not None}


def _figure_bytes(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(curves: dict[str, list[dict[str, Any]]]) -> bytes | None:
    """Each loss term against step, one line per student; None when no student has metrics."""
    present = [(k, title) for k, title in LOSS_TERMS
               if any(_series(rows, k)[0] for rows in curves.values())]
    if not present:
        return None
    plt = _pyplot()
    cols = min(2, len(present))
    nrows = math.ceil(len(present) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 3.6 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes.flat, present):
        absent = []
        for i, (name, rows) in enumerate(curves.items()):  # one colour per student in every panel
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, label=name, color=colors[i % len(colors)], linewidth=1.3)
            else:
                absent.append(name)
        # a term an ablation switched off is logged as null: say so rather than leave a gap
        ax.set_title(title + (f"\n(not logged by: {', '.join(absent)})" if absent else ""))
        ax.set_xlabel("training step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    legend: dict[str, Any] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, h)
    labels, handles = list(legend), list(legend.values())
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 5),
               bbox_to_anchor=(0.5, 1.0), frameon=False, title="student")
    fig.suptitle("Student training curves (from each run's metrics.jsonl)", y=1.06)
    fig.tight_layout()
    return _figure_bytes(fig)


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    pts = [(float(r["step"]), float(r[key])) for r in rows
           if isinstance(r.get("step"), (int, float)) and isinstance(r.get(key), (int, float))
           and math.isfinite(r[key])]
    if len(pts) > _MAX_POINTS:
        stride = math.ceil(len(pts) / _MAX_POINTS)
        pts = pts[::stride] + [pts[-1]]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_retention(report: Report) -> bytes | None:
    """Grouped bars: per task (and the mean), each student's median score as % of the teacher's."""
    tasks = report.tasks
    students = report.students
    if not tasks or not students:
        return None
    plt = _pyplot()
    import numpy as np

    groups = [t.name for t in tasks] + (["mean of tasks"] if len(tasks) > 1 else [])
    panel = max(5.0, 1.5 + len(groups) * (0.5 + 0.35 * len(students)))
    fig, axes = plt.subplots(1, 2, figsize=(2 * panel, 4.2), squeeze=False)
    width = min(0.8 / len(students), 0.25)
    x = np.arange(len(groups))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric, label in ((axes[0, 0], "accuracy", "accuracy"), (axes[0, 1], "macro_f1", "macro-F1")):
        top = 100.0
        for j, s in enumerate(students):
            vals, lo, hi = [], [], []
            for t in tasks:
                r = _task_result(t, s)
                teacher = _task_result(t, report.teacher)
                if r is None or teacher is None or getattr(teacher, metric).median == 0:
                    vals.append(np.nan)
                    lo.append(0)
                    hi.append(0)
                    continue
                base = getattr(teacher, metric).median
                sp = getattr(r, metric)
                v = 100 * sp.median / base
                vals.append(v)
                lo.append(v - 100 * sp.min / base)
                hi.append(100 * sp.max / base - v)
            if len(tasks) > 1:
                vals.append(float(np.nanmean(vals)) if not all(np.isnan(vals)) else np.nan)
                lo.append(0)
                hi.append(0)
            pos = x - width * len(students) / 2 + width * (j + 0.5)
            ax.bar(pos, vals, width, yerr=[lo, hi], capsize=3, label=s, color=colors[j % len(colors)])
            for px, v, h in zip(pos, vals, hi):
                if not np.isnan(v):  # above the whisker, so the two never overlap
                    ax.text(px, v + h + 1, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
            top = max([top] + [v + h for v, h in zip(vals, hi) if not np.isnan(v)])
        ax.axhline(100, color="black", linewidth=1, linestyle="--", label="teacher = 100%")
        ax.set_xticks(x, groups)
        ax.set_ylim(0, top * 1.12)
        ax.set_ylabel(f"{label}, % of teacher")
        ax.set_xlabel("task")
        ax.set_title(f"Retention of the teacher's {label}")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.suptitle("How much of the teacher each student kept (median over seeds; whiskers: min–max)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    return _figure_bytes(fig)


def plot_tradeoff(report: Report) -> bytes | None:
    """Retention (mean over tasks, else masked-LM top-1) against speed-up, area ~ parameters."""
    if not report.speed or not report.students:
        return None
    speed = {r.model: r for r in report.speed.results}
    size = {m.name: m.parameters for m in report.models}
    kept: dict[str, float] = {}
    what = ""
    if report.tasks:
        what = "mean downstream accuracy, % of teacher"
        for name in [report.teacher, *report.students]:
            vals = [100.0 if name == report.teacher else
                    getattr(_task_result(t, name), "accuracy_retention", None) for t in report.tasks]
            if all(v is not None for v in vals):
                kept[name] = sum(vals) / len(vals)
    elif report.mlm:
        what = "masked-LM top-1 accuracy, % of teacher"
        kept = {report.teacher: 100.0,
                **{k: v for k, v in report.mlm.top1_retention.items() if v is not None}}
    if not kept:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    biggest = max(size.values()) or 1
    names = [report.teacher, *report.students]
    for i, name in enumerate(names):
        if name not in kept or speed.get(name) is None or speed[name].latency_speedup is None:
            continue
        xs, ys = speed[name].latency_speedup, kept[name]
        is_teacher = name == report.teacher
        ax.scatter([xs], [ys], s=60 + 600 * size[name] / biggest, alpha=0.7,
                   color="black" if is_teacher else colors[(i - 1) % len(colors)],
                   marker="*" if is_teacher else "o",
                   label=f"{name} ({count(size[name])} params)")
        ax.annotate(name, (xs, ys), xytext=(9, 7 - 11 * (i % 3)), textcoords="offset points", fontsize=8)
    ax.axhline(100, color="grey", linewidth=0.8, linestyle="--")
    ax.axvline(1, color="grey", linewidth=0.8, linestyle="--")
    ax.margins(0.2)
    ax.set_xlabel("speed-up over the teacher (batch-1 latency)")
    ax.set_ylabel(what)
    ax.set_title("What each student kept, and how much faster it is")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", markerscale=0.5, title="marker area ~ parameters", title_fontsize=8)
    fig.tight_layout()
    return _figure_bytes(fig)
