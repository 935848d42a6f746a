"""The `kdpipe` command line. Each stage module defines its click `command`; this module wires
them into one group (imported lazily, so `kdpipe --help` stays fast) and turns a KdpipeError
into a one-line `Error: ...` with a non-zero exit, never a traceback.

    kdpipe teacher-dump --teacher PATH --data corpus.txt --out CACHE_DIR
    kdpipe cache verify CACHE_DIR
    kdpipe cache info CACHE_DIR
"""

from __future__ import annotations

import errno
import importlib
import os
from typing import Any

import click

from kdpipe import __version__
from kdpipe.pipeline.errors import KdpipeError

# name -> "module:attribute" of a click command; one line per stage.
COMMANDS = {
    "teacher-adapt": "kdpipe.stages.teacher_adapt:command",
    "teacher-dump": "kdpipe.stages.teacher_dump:command",
    "cache": "kdpipe.stages.cache_tools:command",
    "student-train": "kdpipe.stages.student_train:command",
    "eval": "kdpipe.stages.evaluate:command",
    "demo": "kdpipe.stages.demo:command",
}


class LazyGroup(click.Group):
    """Imports a stage only when its command runs, and shows KdpipeError without a traceback."""

    def __init__(self, *args: Any, commands_table: dict[str, str] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.table = commands_table or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.table})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.table:
            module, attr = self.table[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KdpipeError as e:
            raise click.ClickException(str(e)) from None
        except Exception as e:  # a full disk at a write no stage wrapped: still one line
            from kdpipe.pipeline.fsutil import write_errno, write_error_message

            code = write_errno(e)
            if code not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            where = next((x.filename for x in (e, e.__context__) if getattr(x, "filename", None)), None)
            raise click.ClickException(write_error_message(where or "the output", code)) from None


def __getattr__(name: str) -> Any:
    """The stages' click helpers live in pipeline/config.py; imported from here on demand, as
    before, without slowing `kdpipe --help`."""
    if name in ("floats_option", "ints_option", "config_option", "echo_json"):
        from kdpipe.pipeline import config

        return getattr(config, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@click.group(cls=LazyGroup, commands_table=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="kdpipe")
def cli() -> None:
    """Offline knowledge distillation for masked language models.

    Stage 1 (teacher-dump) runs the teacher once and caches what distillation needs; stage 2
    (student-train) trains any number of students from that cache; stage 3 (eval) compares
    teacher and students.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    cli(prog_name="kdpipe")
