"""Every figure of ../shared/BENCHMARKS.md (P1–P8, P12) in one run, one line each, then a summary.

    python -m benchmarks.run_all [--quick] [--only P1,P5] [--threads N] [--pairs N]

Exits 0 whatever the results (a benchmark reports; tests assert). ``--quick`` uses small shapes so the
whole suite runs in about a minute; its ratios show per-op overhead more than the reference model's
costs, so only the full mode's table is compared with the goals.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import torch

from . import dora, forward, mixed_batch, serve, train_step
from .common import HEADER, Result, add_arguments, configure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--only", default=None, help="comma-separated figure ids, e.g. P1,P6")
    args = parser.parse_args(argv)
    setup = configure(args)
    only = set(args.only.split(",")) if args.only else None
    start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"lorakit benchmarks {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {load:.2f}, torch {torch.__version__}")
    print(setup.describe())
    print(HEADER)
    results: list[Result] = []
    for module in (train_step, forward, mixed_batch, dora, serve):
        results += module.run(setup, only)
    passed = sum(r.passed for r in results)
    print(f"{passed}/{len(results)} goals met in {time.perf_counter() - start:.0f} s "
          f"({'quick shapes: indicative only' if setup.quick else 'full shapes'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
