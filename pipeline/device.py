"""The device is whatever torch offers, and the precision the user's choice.

Precision (--precision): fp32 (no autocast), bf16 or fp16 (torch.autocast to that dtype, on CUDA or
CPU), auto (bf16 on CUDA, fp32 on CPU: what training and eval default to). --tf32 lets CUDA's
float32 matmuls and convolutions use TF32 (PyTorch's own default leaves matmuls in full fp32).
The dump runs the teacher at the precision its config names (fp32 by default, auto not offered):
the targets it stores never depend on an autocast nobody asked for.

fp16 training scales the loss (`grad_scaler`, torch.amp.GradScaler, on CUDA or CPU): float16's
small range makes unscaled gradients underflow to 0, and a scale too large for a step makes them
overflow, after which that step is skipped and the scale halved (growing again by 2 after 2,000
clean steps). bf16 has float32's range and needs no scaling.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_default = "auto"  # what autocast() uses when not told: set per stage by configure()
# fp16: an overflowing gradient is normal (the scaler skips that update and halves its scale), but
# one that overflows at a scale of 1 (no scaling left to undo) is not: training stops there
MIN_LOSS_SCALE = 1.0


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> bf16 on CUDA, fp32 elsewhere; the others as they are."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run in hardware here: CUDA, or a CPU with AVX512-BF16 or AMX. There
    bf16 autocast trains several times faster than fp32 (bench/cpu_precision.py); elsewhere it is
    emulated and slower, so nothing picks it without this check."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own CPUID checks
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def configure(precision: str = "auto", tf32: bool = False) -> None:
    """A stage's precision for every autocast() that names none, and TF32 on or off."""
    global _default
    _default = precision
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def grad_scaler(device: torch.device, precision: str | None = None) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 training (`precision` None: the stage's), None for any other."""
    p = resolve_precision(_default if precision is None else precision, device)
    return torch.amp.GradScaler(device.type) if p == "fp16" else None


def autocast(device: torch.device, precision: str | None = None) -> AbstractContextManager:
    """Autocast to the precision's dtype (none for fp32); `precision` None: the stage's."""
    p = resolve_precision(_default if precision is None else precision, device)
    if p == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[p])
