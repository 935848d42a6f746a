"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class KdpipeError(Exception):
    """Bad input or a refused operation; the message says what is wrong and what to do."""


class ConfigError(KdpipeError):
    """One or more configuration values are invalid; the message lists every problem."""


class CacheMismatchError(KdpipeError):
    """A cache or run was made with settings that differ from the ones asked for."""


class CorruptCacheError(KdpipeError):
    """A file does not match what the manifest says about it."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): libraries'
    multi-line messages become one `Error: ...` line."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def validate_record(cls: type[M], raw: Any, what: str, error: type[KdpipeError] = KdpipeError) -> M:
    """A JSON record read from disk as its schema, or one line naming the first bad field
    (`what is invalid: key.path: reason`), never pydantic's multi-line report."""
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(record)"
        raise error(f"{what} is invalid: {where}: {err['msg']}") from None
