"""Several processes (`torchrun`): who this process is, the process group, and the few collectives
the stages need.

    torchrun --nproc-per-node 2 "$(which kdpipe)" teacher-dump ...    # shards split by rank
    torchrun --nproc-per-node 2 "$(which kdpipe)" student-train ...   # DDP, global batch split by rank

Rank and world size come from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK); without
it this is one process of a world of one and every collective is a no-op, so the single-process
code path is the distributed one with world = 1. The group uses gloo on CPU and nccl on CUDA.

Errors: a refusal (KdpipeError) found on one rank must reach the user as one line, not one per rank
and not as a hang in the next collective. `agree` runs a step on every rank and then exchanges
"ok / failed": where any rank failed, the lowest failing rank prints its `Error: ...` line, every
rank waits until it is out (torchrun stops the others as soon as one exits), then all leave with
status 1 and torchrun ends the job (adding its own report of the failed processes).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import click
import torch
import torch.distributed as dist

from kdpipe.pipeline.errors import KdpipeError

T = TypeVar("T")


class JobFailed(SystemExit):
    """A rank failed and its error has been printed: every rank leaves quietly (exit status 1)."""

    def __init__(self) -> None:
        super().__init__(1)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes what is written once (manifest, checkpoints, metrics, final/)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def owns_shard(self, index: int) -> bool:
        """Shard i is dumped by rank i % world: a fixed split, whatever finished before."""
        return shard_owner(index, self.size) == self.rank

    def part(self, rows: int) -> tuple[int, int]:
        """[lo, hi) of this rank's contiguous share of `rows` global rows (sizes differ by <= 1)."""
        return self.rank * rows // self.size, (self.rank + 1) * rows // self.size


def shard_owner(index: int, world_size: int) -> int:
    return index % world_size


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise KdpipeError(f"environment variable {name}={raw!r} is not an integer (torchrun sets it)") from None


def from_env() -> World:
    """The torchrun environment, checked; a world of one without it."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size:
        raise KdpipeError(f"RANK={rank} and WORLD_SIZE={size} do not describe a process of a job")
    return World(rank, size, local)


_WORLD: World | None = None


def init(device: str = "auto", timeout_s: float = 1800) -> World:
    """Join the job's process group once (gloo on CPU, nccl on CUDA, one GPU per local rank).
    `device` is the stage's --device: `auto` or `cuda*` with CUDA available means nccl."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    world = from_env()
    if world.distributed and not dist.is_initialized():
        cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
        if cuda:
            torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    _WORLD = world
    return world


def world() -> World:
    """The world joined by `init` (a world of one when nothing joined one)."""
    return _WORLD if _WORLD is not None else World()


def local_device(requested: torch.device, w: World) -> torch.device:
    """On CUDA each local rank uses its own GPU (`cuda` alone would put every rank on GPU 0)."""
    if w.distributed and requested.type == "cuda" and requested.index is None:
        return torch.device("cuda", w.local_rank % torch.cuda.device_count())
    return requested


def shutdown() -> None:
    global _WORLD
    if dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = None


@contextmanager
def joined(device: str = "auto") -> Iterator[World]:
    """The process group for one stage's run (a world of one outside torchrun), left at the end.

    On a normal end every rank meets at a barrier first and the stage's objects (a DDP model and
    its reducer hold the group and gloo work) are collected, so no rank tears the group down
    while a peer is still inside a collective or a worker thread still holds work: the likely
    cause of one SIGABRT seen at exit ("terminate called without an active exception")."""
    w = init(device)
    try:
        yield w
    except BaseException:
        shutdown()  # a failed rank leaves at once; torchrun stops the others
        raise
    barrier(w)
    gc.collect()
    shutdown()


def barrier(w: World) -> None:
    if w.distributed:
        dist.barrier()


def all_gather(w: World, obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable, small), in rank order."""
    if not w.distributed:
        return [obj]
    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def broadcast(w: World, obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not w.distributed:
        return obj
    box = [obj if w.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def agree(w: World, step: Callable[[], T]) -> T:
    """Run `step` here, then learn whether it failed anywhere (a collective: every rank calls it).

    Returns step's result where every rank succeeded. Where some failed with a KdpipeError, the
    lowest failing rank prints it as the CLI would, and every rank raises JobFailed (exit 1)."""
    error: KdpipeError | None = None
    try:
        result = step()
    except KdpipeError as e:
        if not w.distributed:
            raise
        error = e
    failed = [r for r, bad in enumerate(all_gather(w, error is not None)) if bad]
    if not failed:
        return result
    if error is not None and w.rank == failed[0]:
        click.ClickException(str(error)).show()
    barrier(w)  # the message is out before any rank exits
    raise JobFailed()


def refuse_url(w: World, flag: str, url: str) -> None:
    """Several ranks write a cache or run through one shared folder; a URL is staged per process."""
    if w.distributed:
        raise KdpipeError(f"{flag} {url}: URLs are not supported under torchrun yet; give a folder "
                          "on a file system every rank shares (and copy it to the store afterwards)")


def all_reduce_sum(w: World, values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks, in float64 (metrics: loss terms, token counts)."""
    if not w.distributed:
        return [float(v) for v in values]
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()
