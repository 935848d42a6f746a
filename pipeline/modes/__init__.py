"""The target modes of a cache, one module each, registered here by name.

Callers ask the mode object (`get_mode(name)`) and never branch on its name; the CLI choices and
config validation read `MODE_NAMES`. A new mode is one new module (a `TargetMode` subclass and
its `MODE` instance) and its line in `MODES`.
"""

from __future__ import annotations

from kdpipe.pipeline.errors import KdpipeError
from kdpipe.pipeline.modes import exact, none, sampled, topk
from kdpipe.pipeline.modes.base import TargetMode, TargetSettings, TeacherHead

MODES: dict[str, TargetMode] = {m.name: m for m in (topk.MODE, sampled.MODE, exact.MODE, none.MODE)}
MODE_NAMES: tuple[str, ...] = tuple(MODES)
DEFAULT_MODE = "topk"


def get_mode(name: str) -> TargetMode:
    try:
        return MODES[name]
    except KeyError:
        raise KdpipeError(f"unknown target mode {name!r} (known: {', '.join(MODE_NAMES)})") from None


__all__ = ["DEFAULT_MODE", "MODES", "MODE_NAMES", "TargetMode", "TargetSettings", "TeacherHead", "get_mode"]
