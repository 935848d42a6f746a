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
import json
import os
from collections.abc import Callable
from pathlib import Path
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


# ------------------------------------------------------------------ helpers shared by the stages

def _list_option(kind: type, what: str) -> Callable[[click.Context, click.Parameter, str | None], list | None]:
    """A click callback parsing '1,2,4' into a list of `kind`, with the option named on error."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> list | None:
        if value is None:
            return None
        try:
            return [kind(x) for x in value.split(",") if x.strip()]
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {what}, got {value!r}") from None

    return parse


floats_option = _list_option(float, "numbers")
ints_option = _list_option(int, "integers")


config_option = click.option(
    "--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
    help="YAML or JSON file of settings (keys are the long flag names with _); flags given on "
    "the command line override it.",
)


def build_config(cls: type, config_file: Path | None, flags: dict[str, Any]) -> Any:
    """Typed config from a file and the flags that were given (click passes None otherwise)."""
    from kdpipe.pipeline.config import build_config as build

    given = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items()}
    return build(cls, config_file, {k: v for k, v in given.items() if v not in (None, [])})


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


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
