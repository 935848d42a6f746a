"""A DistilBERT student beside the BERT-shaped one, both built from the same teacher layers.

    python bench/distilbert.py [--repeats 10] [--write]

The teacher is a BERT of MiniLM-L6-H384's shape (6 layers, hidden 384, 12 heads, 30,522 tokens)
built in code with seeded random weights (no download; size and speed do not depend on the
values). Both students take teacher layers 0, 2, 4 (kdpipe's default map for half the layers):
`BertForMaskedLM` (the teacher's architecture) and `DistilBertForMaskedLM` (--student-arch
distilbert). Printed side by side in one run: parameters, encoder latency at batch 1 and
throughput at batch 32 x 128 tokens, timed interleaved (pipeline/speed.py, as `kdpipe eval`
does), and the largest logit difference between the teacher and a DistilBERT built from all six
of its layers (the name map and the folded token-type row make them the same function).
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch

from kdpipe.pipeline import speed
from kdpipe.pipeline import student as stu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--write", action="store_true", help="replace this section of bench/RESULTS.md")
    args = ap.parse_args()
    from transformers import BertConfig, BertForMaskedLM

    from results import machine, write_section  # bench/results.py (bench/ is on sys.path)

    torch.manual_seed(0)
    tcfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536)
    teacher = BertForMaskedLM(tcfg).eval()
    state = teacher.state_dict()
    models = {"teacher (BERT, 6 layers)": teacher}
    for arch, name in (("teacher", "BERT student (3 layers)"), ("distilbert", "DistilBERT student (3 layers)")):
        m = stu.build_student(stu.student_config(tcfg.to_dict(), layers=3, arch=arch), seed=0)
        stu.init_from_teacher(m, state, [0, 2, 4])
        models[name] = m.eval()
    full = stu.build_student(stu.student_config(tcfg.to_dict(), layers=6, arch="distilbert"), seed=0)
    stu.init_from_teacher(full, state, list(range(6)))
    ids = torch.randint(1000, 30000, (4, 128))
    att = torch.ones_like(ids)
    with torch.no_grad():
        diff = (full.eval()(input_ids=ids, attention_mask=att).logits
                - teacher(input_ids=ids, attention_mask=att).logits).abs().max().item()

    tok = SimpleNamespace(all_special_ids=[0, 100, 101, 102, 103], cls_token_id=101, sep_token_id=102)
    bench = speed.Bench(batch_size=32, seq_len=128, repeats=args.repeats, warmup=2)
    res = speed.measure(models, tok, bench, torch.device("cpu"))
    rows = {n: {"latency_ms": res["latency_ms"][n], "throughput": res["throughput"][n]} for n in models}
    base = "BERT student (3 layers)"
    lines = [
        "## DistilBERT student (issue 15)", "",
        f"`python bench/distilbert.py --repeats {args.repeats}` — {machine()}.", "",
        "MiniLM-L6-H384-shaped BERT teacher built in code; both students take teacher layers 0, 2, 4. "
        "Encoder forward, random tokens, inference mode, models timed interleaved (median of the repeats).", "",
        "| model | parameters (encoder) | with MLM head | latency ms (b=1, 128 tok) | throughput seq/s (b=32) |",
        "| :--- | ---: | ---: | ---: | ---: |",
    ]
    for name, m in models.items():
        r = rows[name]
        lines.append(f"| {name} | {sum(p.numel() for p in m.base_model.parameters()):,} | "
                     f"{sum(p.numel() for p in m.parameters()):,} | {_median(r['latency_ms']):.2f} | "
                     f"{_median(r['throughput']):.1f} |")
    d, b = rows["DistilBERT student (3 layers)"], rows[base]
    fewer = (sum(p.numel() for p in models[base].base_model.parameters())
             - sum(p.numel() for p in models["DistilBERT student (3 layers)"].base_model.parameters()))
    lines += ["", f"DistilBERT / BERT student, side by side: latency {_median(d['latency_ms']) / _median(b['latency_ms']):.3f}x, "
              f"throughput {_median(d['throughput']) / _median(b['throughput']):.3f}x; {fewer:,} fewer encoder "
              "parameters (no token-type embeddings; neither masked LM has a pooler). The two compute the same "
              "layers, so a ratio far from 1 is the machine's noise (batch-1 latency most of all on a loaded "
              "machine). A DistilBERT built from all six teacher layers: largest |logit difference| from the "
              f"teacher {diff:.2e}.", ""]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("## DistilBERT student (issue 15)", text)


def _median(v: list[float]) -> float:
    s = sorted(v)
    return float(s[len(s) // 2])


if __name__ == "__main__":
    main()
