"""bench/RESULTS.md: each bench script owns one section (from its `## ` heading to the next one)
and replaces only that, so a rerun of one bench leaves the others' measurements alone."""

from __future__ import annotations

import os
import platform
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# kdpipe benchmark results\n\nMeasured by the scripts in `bench/`; each section says how.\n"


def write_section(heading: str, text: str) -> Path:
    """Replace the section that starts with `heading`, or append `text` as a new one."""
    old = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else HEADER
    start = old.find(heading)
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        nxt = old.find("\n## ", start + len(heading))
        new = old[:start] + text.rstrip("\n") + "\n" + ("" if nxt < 0 else old[nxt:])
    RESULTS.write_text(new.rstrip("\n") + "\n", encoding="utf-8")
    return RESULTS


def machine() -> str:
    """The machine line every section starts with: cores, torch and its threads, the load now."""
    import torch

    load = os.getloadavg()
    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads, load average {load[0]:.2f} / {load[1]:.2f}")
