"""The demo's choices that do not need its built-in downloads: its precision."""

from __future__ import annotations

import torch

from kdpipe.pipeline.device import native_bf16
from kdpipe.stages import demo


def test_auto_precision_is_bf16_exactly_where_the_cpu_has_it_in_hardware() -> None:
    probes = [getattr(torch.cpu, n)() for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
              if hasattr(torch.cpu, n)]
    assert native_bf16(torch.device("cpu")) == any(probes)
    assert demo.demo_precision("auto", "cpu") == ("bf16" if any(probes) else "fp32")
    assert not native_bf16(torch.device("meta"))


def test_an_explicit_precision_is_kept() -> None:
    assert demo.demo_precision("fp32", "cpu") == "fp32"
    assert demo.demo_precision("bf16", "cpu") == "bf16"
