"""Typed stage configuration: a YAML/JSON file, overridden by command-line flags.

Each stage declares a frozen pydantic model; unknown keys and wrong types are rejected, and
every problem is reported at once, one line each, naming the key. The click helpers every stage's
command shares (--config, list options, the JSON summary) live here too, so a stage imports this
module and never the CLI module that loads it by name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from kdpipe.pipeline.errors import ConfigError

C = TypeVar("C", bound="StageConfig")
N = TypeVar("N", int, float)


# torch.manual_seed and numpy take seeds up to 2**32 - 1 (numpy's limit); a larger one was a
# traceback from deep inside torch
MAX_SEED = 2**32 - 1


class StageConfig(BaseModel):
    """Base of every stage's configuration: frozen, and no key it does not know."""

    # allow_inf_nan: a nan or inf setting (--temperatures nan, --lr inf) is refused where it is read
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


def _format_errors(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(config)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif not e["loc"]:  # a check across keys: its message names them
            lines.extend(str(e["msg"]).removeprefix("Value error, ").split("; "))
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return lines


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping (JSON is YAML), with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid YAML/JSON: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def build_config(cls: type[C], config_file: Path | None, overrides: dict[str, Any]) -> C:
    """File values first, then flags that were given: None (click's value for a flag not given,
    and an empty tuple for a repeatable one) means 'not given'."""
    values = read_config_file(config_file) if config_file else {}
    given = {k: (list(v) if isinstance(v, tuple) else v) for k, v in overrides.items()}
    values.update({k: v for k, v in given.items() if v is not None and v != []})
    try:
        return cls(**values)
    except ValidationError as e:
        problems = _format_errors(e)
        head = f"invalid configuration ({len(problems)} problem{'s' if len(problems) > 1 else ''}): "
        raise ConfigError(head + "; ".join(problems)) from None


# ------------------------------------------------------------------ click helpers of the stages

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


def sorted_distinct(values: list[N], too_small: Callable[[N], bool], small: str, name: str = "") -> list[N]:
    """A list setting whose order means nothing (temperatures, layers, a sweep's grid): every value
    checked, none repeated, sorted so that the same set is always one fingerprint."""
    if any(too_small(x) for x in values):
        raise ValueError(small)
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must be distinct".lstrip())
    return sorted(values)


def echo_json(obj: Any) -> None:
    """A stage's summary on stdout."""
    click.echo(json.dumps(obj, indent=2, sort_keys=True))
