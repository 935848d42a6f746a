"""kdpipe: offline knowledge distillation for masked language models.

The code lives in the repository's `pipeline/` (shared machinery), `stages/` (one module per
CLI stage) and `schemas/` (versioned on-disk formats), installed as `kdpipe.pipeline`,
`kdpipe.stages` and `kdpipe.schemas`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("kdpipe")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
