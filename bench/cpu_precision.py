"""fp32 against bf16 autocast for one training step on this machine's CPU, side by side.

    python bench/cpu_precision.py [--repeats 15] [--threads 2]

Why: `kdpipe demo --precision auto` picks bf16 where `device.native_bf16` says the CPU has bf16 in
hardware (AVX512-BF16 or AMX). This measures what that buys, for the two kinds of step the demo
spends its time on: a sequence-classification fine-tuning step (eval's sweep and seeds; MiniLM-L6
size, batch 32 x 28 tokens) and a masked-LM step (student-train and teacher-adapt; 3 layers,
batch 16 x 128 tokens, the 30,522-way head at 15% of positions). Random weights and tokens: speed
does not depend on them. Steps alternate between the two precisions so that load from other jobs
falls on both alike; it prints each one's median and the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable

import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from kdpipe.pipeline.device import native_bf16

VOCAB = 30522


def config(layers: int) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=384, num_hidden_layers=layers, num_attention_heads=12,
                      intermediate_size=1536)


def classify_step(gen: torch.Generator) -> Callable[[contextlib.AbstractContextManager], None]:
    model = BertForSequenceClassification(config(6)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(1000, VOCAB, (32, 28), generator=gen)  # (B, T)
    y = torch.randint(0, 2, (32,), generator=gen)

    def step(ctx: contextlib.AbstractContextManager) -> None:
        with ctx:
            loss = model(input_ids=ids, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def mlm_step(gen: torch.Generator) -> Callable[[contextlib.AbstractContextManager], None]:
    model = BertForMaskedLM(config(3)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(1000, VOCAB, (16, 128), generator=gen)  # (B, T)
    masked = torch.rand(16, 128, generator=gen) < 0.15
    labels = torch.where(masked, ids, torch.full_like(ids, -100))

    def step(ctx: contextlib.AbstractContextManager) -> None:
        with ctx:
            hidden = model.bert(input_ids=ids).last_hidden_state[masked]  # (N, H): the head at masked rows
            logits = model.cls(hidden)  # (N, V)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels[masked])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    print(f"bf16 in hardware here: {native_bf16(cpu)}; {args.threads} thread(s); load {os.getloadavg()[0]:.2f}")
    precisions = {"fp32": contextlib.nullcontext, "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    for name, build in (("fine-tune step (6 layers, 32 x 28)", classify_step),
                        ("masked-LM step (3 layers, 16 x 128)", mlm_step)):
        step = build(torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {p: [] for p in precisions}
        for p, ctx in precisions.items():  # warm-up: first calls pick kernels and allocate
            step(ctx())
            step(ctx())
        for _ in range(args.repeats):
            for p, ctx in precisions.items():
                t0 = time.perf_counter()
                step(ctx())
                times[p].append(time.perf_counter() - t0)
        med = {p: statistics.median(t) for p, t in times.items()}
        print(f"{name}: fp32 {med['fp32'] * 1e3:.0f} ms, bf16 {med['bf16'] * 1e3:.0f} ms, "
              f"bf16 speed-up {med['fp32'] / med['bf16']:.2f}x")
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
