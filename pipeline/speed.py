"""Size and speed for `kdpipe eval`: parameters, weights on disk, latency and throughput.

Speed is the encoder alone (model.base_model: no MLM or task head) on random non-special tokens,
in inference mode: batch-1 latency and larger-batch throughput. Models are timed interleaved:
every repeat times each model once, in an order rotated by one each repeat, so a slow phase of a
shared machine falls on all models alike; the report gives the median of the repeats.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdpipe.pipeline.compiling import Compile, compiled
from kdpipe.pipeline.device import autocast
from kdpipe.pipeline.fsutil import sha256_bytes, sha256_file

WHAT = "encoder forward (model.base_model: no MLM or task head), random tokens, inference mode"


@dataclass(frozen=True)
class Bench:
    batch_size: int = 32  # of the throughput test; latency is batch 1
    seq_len: int = 128
    repeats: int = 10
    warmup: int = 2  # untimed calls per model and batch


def size(model: torch.nn.Module, files: list[Path]) -> dict[str, Any]:
    """Weights files, bytes and hash (one file's SHA-256, or a hash of the shards' hashes),
    parameters (encoder, as the paper counts, and with the head), layers, width, vocabulary,
    architecture (the masked LM's class)."""
    if len(files) == 1:
        digest = sha256_file(files[0])
    else:
        digest = sha256_bytes("".join(f"{f.name}:{sha256_file(f)}\n" for f in files).encode())
    c = model.config
    return {
        "weights_files": [f.name for f in files], "weights_bytes": sum(f.stat().st_size for f in files),
        "weights_sha256": digest,
        "parameters": sum(p.numel() for p in model.base_model.parameters()),
        "parameters_with_head": sum(p.numel() for p in model.parameters()),
        "layers": getattr(c, "num_hidden_layers", None) or getattr(c, "n_layers", None),
        "hidden_size": getattr(c, "hidden_size", None) or getattr(c, "dim", None),
        "vocab_size": int(c.vocab_size), "architecture": type(model).__name__,
    }


def measure(models: dict[str, torch.nn.Module], tokenizer: Any, bench: Bench,
            device: torch.device, compile_spec: Compile | None = None) -> dict[str, Any]:
    """Latency (ms, batch 1) and throughput (sequences/s) per repeat of every masked LM's encoder,
    interleaved (see the module docstring). Token ids are drawn from the smallest vocabulary of
    the models, so every model can embed them. Compiled encoders get at least one warm-up call
    per batch shape, so the compiling itself is never timed."""
    vocab_size = min(int(m.config.vocab_size) for m in models.values())
    specials = set(tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(vocab_size) if i not in specials], dtype=torch.long)
    g = torch.Generator().manual_seed(0)

    def batch(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = pool[torch.randint(len(pool), (b, bench.seq_len), generator=g)]  # (B, T)
        ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
        return ids.to(device), torch.ones_like(ids, device=device)

    one, big = batch(1), batch(bench.batch_size)
    encoders = {name: compiled(m.to(device).base_model, compile_spec) for name, m in models.items()}

    def timed(name: str, inputs: tuple[torch.Tensor, torch.Tensor]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), autocast(device):
            encoders[name](input_ids=inputs[0], attention_mask=inputs[1])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    names = list(encoders)
    for _ in range(max(bench.warmup, 1) if compile_spec else bench.warmup):
        for n in names:
            timed(n, one)
            timed(n, big)
    lat: dict[str, list[float]] = {n: [] for n in names}
    thr: dict[str, list[float]] = {n: [] for n in names}
    for r in range(bench.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            lat[n].append(1000 * timed(n, one))
        for n in order:
            thr[n].append(bench.batch_size / timed(n, big))
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    return {"device": str(device) + gpu, "torch_threads": torch.get_num_threads(),
            "latency_ms": lat, "throughput": thr}
