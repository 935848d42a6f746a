"""`torch.compile` for the teacher's forward (dump), the student's (training) and eval's, named as
Hugging Face's TrainingArguments names it: --torch-compile, --torch-compile-backend (inductor
unless given), --torch-compile-mode (inductor's: default, reduce-overhead, max-autotune, ...).
As there, giving a backend or a mode turns compiling on.

What is compiled is a module's forward, through a wrapper (`torch.compile(module)`) that shares the
module's parameters: the module itself, its state_dict and so every checkpoint and save_pretrained
folder, keep their plain names (no `_orig_mod.` prefix). The first batches of each new shape pay the
compile time (seconds to minutes); after the first recompile torch marks the batch and sequence
dimensions dynamic, so shapes that vary from batch to batch do not compile again and again.
Compiling may change float results slightly (inductor fuses and reorders float operations), so
wherever results are recorded (a cache's fingerprint, a run's identity, an eval's settings) a
compile is recorded with them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click
from pydantic import model_validator

from kdpipe.pipeline.config import StageConfig

DEFAULT_BACKEND = "inductor"
# backends torch lists that need a package torch does not ship
_BACKEND_PACKAGES = {"tvm": "tvm", "openxla": "torch_xla", "openxla_eval": "torch_xla"}
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Compile:
    """What torch.compile is called with."""

    backend: str = DEFAULT_BACKEND
    mode: str | None = None

    def record(self) -> dict[str, Any]:
        """As a fingerprint, identity or settings record it."""
        return {"backend": self.backend, "mode": self.mode}


def backend_problem(backend: str) -> str | None:
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        shown = sorted(set(torch._dynamo.list_backends()) | {"eager", "aot_eager"})
        return f"torch_compile_backend: unknown backend {backend!r} (choose from {', '.join(shown)})"
    package = _BACKEND_PACKAGES.get(backend)
    if package and importlib.util.find_spec(package) is None:
        return f"torch_compile_backend: the {backend} backend needs the {package} package, which is not installed"
    return None


def mode_problem(mode: str, backend: str) -> str | None:
    if backend != DEFAULT_BACKEND:
        return f"torch_compile_mode is a mode of the inductor backend; the {backend} backend takes none"
    import torch._inductor

    modes = list(torch._inductor.list_mode_options())
    if mode not in modes:
        return f"torch_compile_mode: unknown mode {mode!r} (choose from {', '.join(modes)})"
    return None


class CompileSettings(StageConfig):
    """The three settings, for the configs of the stages that run a model."""

    torch_compile: bool = False
    torch_compile_backend: str | None = None  # None: inductor
    torch_compile_mode: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _implied(cls, data: Any) -> Any:
        """A backend or a mode asks for compiling (TrainingArguments does the same)."""
        if isinstance(data, dict) and (data.get("torch_compile_backend") is not None
                                       or data.get("torch_compile_mode") is not None):
            data = {**data, "torch_compile": True}
        return data

    @model_validator(mode="after")
    def _compile_known(self) -> "CompileSettings":
        backend = self.torch_compile_backend or DEFAULT_BACKEND
        problems = [p for p in (backend_problem(backend) if self.torch_compile_backend else None,
                                mode_problem(self.torch_compile_mode, backend) if self.torch_compile_mode else None)
                    if p]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def compile_spec(self) -> Compile | None:
        """None when not compiling."""
        if not self.torch_compile:
            return None
        return Compile(self.torch_compile_backend or DEFAULT_BACKEND, self.torch_compile_mode)

    def compile_record(self) -> dict[str, Any]:
        """{"torch_compile": {backend, mode}} when compiling, else nothing (so what was recorded
        before the option existed is unchanged)."""
        spec = self.compile_spec()
        return {} if spec is None else {"torch_compile": spec.record()}


def compiled(module: Any, spec: Compile | None) -> Any:
    """`module` itself (spec None), or torch.compile's wrapper of it, sharing its parameters."""
    if spec is None:
        return module
    import torch

    return torch.compile(module, backend=spec.backend, mode=spec.mode)


def compile_options(what: str) -> Callable[[F], F]:
    """The three click options of a stage; `what` says what is compiled there."""

    def wrap(f: F) -> F:
        for opt in reversed((
            click.option("--torch-compile/--no-torch-compile", default=None,
                         help=f"torch.compile {what}; the first batches of each shape pay the compile "
                         "time. [off]"),
            click.option("--torch-compile-backend", help="torch.compile backend: inductor, or eager / "
                         "aot_eager (no code generation: cheap, for checking); implies --torch-compile. "
                         "[inductor]"),
            click.option("--torch-compile-mode", help="inductor's mode: default, reduce-overhead, "
                         "max-autotune, max-autotune-no-cudagraphs; implies --torch-compile. [default]"),
        )):
            f = opt(f)
        return f

    return wrap
