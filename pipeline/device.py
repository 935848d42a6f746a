"""The device is whatever torch offers: CUDA with bf16 autocast where available, else CPU."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA; full precision on CPU, where bf16 is slower and inexact."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
