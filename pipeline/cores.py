"""How many worker processes or threads to use: from the cores this process may run on.

No torch here: the dump's masking processes import this and nothing heavy.
"""

from __future__ import annotations

import os
import threading
import time

MAX_WORKERS = 256  # more is a typo, not a machine


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(most: int = 32) -> int:
    """One core for the main thread (feeding the device, masking), the others for workers."""
    return max(1, min(cores() - 1, most))


def worker_pid(_: int) -> int:
    """A pool's warm-up job: mapping it over range(n) starts all n worker processes now."""
    return os.getpid()


def die_with_parent(parent: int) -> None:
    """Worker process initializer: exit once the parent is gone. A killed parent closes no pipe a
    worker would notice (the workers hold both ends of their queues), so each one watches."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="kdpipe-watch-parent", daemon=True).start()
