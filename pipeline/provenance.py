"""What every output records about how it was made: resolved config, versions, code revision."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

_PACKAGES = ("kdpipe", "torch", "transformers", "datasets", "pyarrow", "zstandard", "numpy")


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def code_revision() -> str:
    """The git commit of the kdpipe source tree (with '+dirty' for local changes), if it is one."""
    src = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def provenance(config: Any) -> dict[str, Any]:
    """A record to save beside an output: the resolved config, versions and revision."""
    cfg = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    return {"config": cfg, "versions": package_versions(), "code_revision": code_revision()}
