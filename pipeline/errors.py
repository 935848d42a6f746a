"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback."""

from __future__ import annotations

import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
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


class CorruptShardError(CorruptCacheError):
    """A listed shard whose contents break the manifest's promises (rows, columns, values)."""

    def __init__(self, path: Any, what: str, advice: str = "run `kdpipe cache verify --deep` and re-dump the "
                                                           "shard") -> None:
        self.path, self.what, self.advice = path, what, advice
        super().__init__(f"corrupt cache: {path}: {what}; {advice}")

    def __reduce__(self) -> tuple:  # raised in a loader's worker process, re-raised in the loader
        return type(self), (self.path, self.what, self.advice)


def validate_record(cls: type[M], raw: Any, what: str, error: type[KdpipeError] = KdpipeError) -> M:
    """A JSON record read from disk as its schema, or one line naming the first bad field
    (`what is invalid: key.path: reason`), never pydantic's multi-line report."""
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(record)"
        raise error(f"{what} is invalid: {where}: {err['msg']}") from None


def _reading(path: Path, pickled: bool) -> Path:
    """The file a model folder was being read from: its pickle for an unpickling error."""
    if not path.is_dir():
        return path
    names = ("pytorch_model.bin", "model.safetensors") if pickled else ("model.safetensors", "pytorch_model.bin")
    return next((path / n for n in names if (path / n).is_file()), path)


@contextmanager
def tensor_file_errors(path: Path | str) -> Iterator[None]:
    """A pickle, or a damaged or foreign file, where tensors are expected (optimizer.pt, a model's
    weights, a projection): one line naming the file. torch's own message advises retrying with
    weights_only=False, i.e. running the pickle's code; that advice is never passed on."""
    path = Path(path)
    try:
        yield
    except KdpipeError:
        raise
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL (\S+)", str(e))
        asks = f" (it asks for {m.group(1)})" if m else ""
        raise KdpipeError(f"{_reading(path, True)} is a pickle holding more than tensors{asks}; kdpipe never "
                          "runs code from a file, so it refuses it: use a safetensors file, or tensors "
                          "saved by torch.save") from None
    except (EOFError, RuntimeError, KeyError) as e:  # truncated, another archive, a tensor missing
        text = " ".join(str(e).split()) or type(e).__name__
        if "weights_only" in text or len(text) > 200:
            text = type(e).__name__
        raise KdpipeError(f"{_reading(path, False)} cannot be read as tensors ({text}); it is damaged or "
                          "not the file kdpipe wrote: replace it or rerun what made it") from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise KdpipeError(f"{_reading(path, False)} is not a valid safetensors file ({first_line(e)}); it is "
                          "damaged or not the file kdpipe wrote: replace it or rerun what made it") from None
