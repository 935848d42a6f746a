"""Benchmark: packing one enormous document stays linear in its length.

    python bench/corpus_pack.py            # 150k and 1.2M tokens, best of 3 each

Run by hand, never by the tests (a timed test fails on a loaded machine). `corpus.pack` cuts a
document's buffer by offset; cutting it by slicing off the front would copy the rest at every
sequence and make 8x the tokens take ~64x the time. Prints the ratio for 8x the tokens: about 8
is linear, and anything under 24 is far from quadratic.
"""

from __future__ import annotations

import argparse
import os
import time

from kdpipe.pipeline.corpus import pack

CLS, SEP = 101, 102


def best_time(n: int, repeats: int) -> float:
    doc = list(range(n))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        count = sum(1 for _ in pack([doc], 128, CLS, SEP, "pack"))
        best = min(best, time.perf_counter() - t0)
    assert count == -(-n // 126)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=150_000, help="the smaller document [150000]")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    small, big = best_time(a.tokens, a.repeats), best_time(8 * a.tokens, a.repeats)
    load = os.getloadavg()
    print(f"{a.tokens:,} tokens {small:.3f} s, {8 * a.tokens:,} tokens {big:.3f} s: {big / small:.1f}x for 8x "
          f"the tokens (linear ~8, quadratic ~64); load average {load[0]:.2f}")


if __name__ == "__main__":
    main()
