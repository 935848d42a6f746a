"""The model card (README.md) in a student run's final/: what the student is, what it was
distilled from and how, in the Hugging Face model-card shape (YAML front matter, then markdown).

student-train writes it with the run; `kdpipe eval` fills in its evaluation section (between
the EVAL_START and EVAL_END markers) from the report it has just written, for every student that
is a kdpipe run. A README.md without the markers is not kdpipe's and is never touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdpipe.pipeline.fsutil import atomic_write_bytes

CARD_NAME = "README.md"
EVAL_START = "<!-- kdpipe:eval -->"
EVAL_END = "<!-- /kdpipe:eval -->"
NO_EVAL = "No `kdpipe eval` report has scored this student yet."


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _rows(pairs: list[tuple[str, Any]]) -> list[str]:
    return ["| setting | value |", "| :--- | :--- |", *[f"| {k} | {v} |" for k, v in pairs]]


def render(*, architecture: str, config: dict[str, Any], parameters: int, teacher: str | None,
           fingerprint: dict[str, Any], fingerprint_sha256: str, cache: str, run: dict[str, Any],
           steps: int, epoch: float) -> str:
    """The card of a finished run: `config` the student's config.json, `fingerprint` the cache
    manifest's, `run` the run record's resolved config and init report."""
    cfg, init = run["config"], run["init"]
    t = (fingerprint.get("teacher") or {})
    targets, masking = (fingerprint.get("targets") or {}), (fingerprint.get("masking") or {})
    seqs, hidden = (fingerprint.get("sequences") or {}), (fingerprint.get("hidden") or {})
    layers = config.get("num_hidden_layers", config.get("n_layers"))
    width = config.get("hidden_size", config.get("dim"))
    heads = config.get("num_attention_heads", config.get("n_heads"))
    temps = ", ".join(f"{x:g}" for x in targets.get("temperatures") or []) or "–"
    if cfg.get("init") == "teacher":
        how_init = f"teacher layers {init.get('layer_map')} (embeddings and MLM head copied where shapes match)"
    elif cfg.get("init") == "pretrained":
        how_init = f"the weights of `{cfg.get('init_from')}`"
    else:
        how_init = f"random (seed {cfg.get('seed')})"
    lines = [
        "---", "library_name: transformers", "pipeline_tag: fill-mask",
        "tags:", "- kdpipe", "- distillation", "- knowledge-distillation", f"- {config.get('model_type')}",
        "---", "",
        f"# {architecture} distilled with kdpipe", "",
        f"A {layers}-layer, {width}-wide {architecture} ({_count(parameters)} parameters with its MLM "
        f"head) distilled offline from a {t.get('model_type', '?')} teacher with the DistilBERT losses "
        "(Sanh et al. 2019), trained from a cache of the teacher's outputs rather than the teacher itself.",
        "", "```python", "from transformers import pipeline", "",
        'fill = pipeline("fill-mask", model="path/to/this/folder")',
        f'fill("the capital of france is {"[MASK]"}.")', "```", "",
        "## Architecture", "",
        *_rows([("class", architecture), ("model_type", config.get("model_type")), ("layers", layers),
                ("hidden size", width), ("attention heads", heads), ("vocabulary", config.get("vocab_size")),
                ("parameters (with MLM head)", f"{parameters:,}")]), "",
        "## Teacher", "",
        *_rows([("teacher", f"`{teacher}`" if teacher else "not recorded"), ("model_type", t.get("model_type")),
                ("hidden size", t.get("hidden_size")), ("weights SHA-256", f"`{t.get('weights_sha256')}`"),
                ("tokenizer SHA-256", f"`{(fingerprint.get('tokenizer') or {}).get('sha256')}`")]), "",
        "## Cache", "",
        *_rows([("cache", f"`{cache}`"), ("fingerprint SHA-256", f"`{fingerprint_sha256}`"),
                ("targets", f"{targets.get('mode')}, k = {targets.get('k')}, at {targets.get('positions')} "
                            f"positions, logits stored raw"),
                ("temperature grid", temps),
                ("hidden states", f"{hidden.get('projection')} projection to {hidden.get('dim')} dims"),
                ("sequences", f"{seqs.get('count')} of {seqs.get('seq_len')} tokens ({seqs.get('packing')})"),
                ("masking", f"{masking.get('mask_prob')} of tokens ({masking.get('mask_token_prob')} [MASK], "
                            f"{masking.get('random_token_prob')} random), {masking.get('views')} view(s), "
                            f"seed {masking.get('seed')}"),
                ("corpus", ", ".join(f"`{f.get('name')}`" for f in (fingerprint.get("corpus") or {}).get("files", []))
                 or "–")]), "",
        "## Distillation", "",
        *_rows([("loss", f"{cfg.get('alpha_ce')} · L_ce + {cfg.get('alpha_mlm')} · L_mlm + "
                         f"{cfg.get('alpha_cos')} · L_cos"),
                ("temperature", cfg.get("temperature")),
                ("L_ce positions", "masked only" if cfg.get("ce_masked_only") else "every non-padding token"),
                ("initialisation", how_init), ("steps", f"{steps} ({epoch:g} epochs)"),
                ("batch", f"{cfg.get('batch_size') or cfg.get('batch_tokens')} "
                          f"{'sequences' if cfg.get('batch_size') else 'tokens'} × {cfg.get('grad_accum')} "
                          "accumulation"),
                ("optimizer", f"AdamW, lr {cfg.get('lr')}, warm-up {cfg.get('warmup')}, linear decay, "
                              f"betas {cfg.get('adam_betas')}, eps {cfg.get('adam_eps')}, weight decay "
                              f"{cfg.get('weight_decay')}, clip {cfg.get('max_grad_norm')}"),
                ("seed", cfg.get("seed")), ("run id", f"`{run.get('run_id')}`")]), "",
        "## Evaluation", "", EVAL_START, NO_EVAL, EVAL_END, "",
        "Made by kdpipe: `run.json` beside this folder holds every setting; `kdpipe_student.json` "
        "names the run and cache.", "",
    ]
    return "\n".join(lines)


def eval_section(report: Any, name: str, report_dir: str) -> str:
    """The evaluation figures of student `name` in an eval Report (schemas/report.py)."""
    out = [f"From `kdpipe eval` (report `{report_dir}`, {report.created_at}), teacher `{report.teacher}`.", ""]
    mlm = {r.model: r for r in report.mlm.results} if report.mlm else {}
    if name in mlm:
        r, t = mlm[name], mlm.get(report.teacher)
        out.append(f"- Masked LM on held-out text: top-1 {100 * r.top1_accuracy:.1f}%"
                   + (f" (teacher {100 * t.top1_accuracy:.1f}%)" if t else "")
                   + (f", agreement with the teacher {100 * r.teacher_agreement:.1f}%"
                      if r.teacher_agreement is not None else ""))
    for task in report.tasks:
        res = {r.model: r for r in task.results}
        if name in res:
            r = res[name]
            ret = f", {r.accuracy_retention:.1f}% of the teacher's" if r.accuracy_retention is not None else ""
            out.append(f"- {task.name}: dev accuracy {100 * r.accuracy.median:.1f}% (median of "
                       f"{len(r.seeds)} fine-tuning seed(s){ret})")
    speed = {r.model: r for r in report.speed.results} if report.speed else {}
    if name in speed:
        r = speed[name]
        out.append(f"- Speed: {r.latency_ms.median:.2f} ms at batch 1 ({r.latency_speedup:.2f}× the teacher), "
                   f"{r.throughput.median:.1f} sequences/s ({r.throughput_speedup:.2f}×)")
    return "\n".join(out)


def fill_eval(folder: Path, section: str) -> bool:
    """Replace the evaluation section of the card in `folder`, atomically; False where the
    folder has no kdpipe card (nothing is written)."""
    card = folder / CARD_NAME
    try:
        text = card.read_text(encoding="utf-8")
    except OSError:
        return False
    start, end = text.find(EVAL_START), text.find(EVAL_END)
    if start < 0 or end < start:
        return False
    new = text[:start + len(EVAL_START)] + "\n" + section + "\n" + text[end:]
    if new != text:
        atomic_write_bytes(card, new.encode("utf-8"))
    return True
