"""Shared by the experiment scripts: where outputs go, the machine line, Markdown helpers.

Every experiment writes ``<name>.md`` (table + provenance + comparison with the paper) and ``<name>.png``
into ``--out`` (default: ``docs/experiments/``). ``--quick`` runs tiny budgets for CI and should be pointed
at a scratch directory so that the committed full-mode outputs are never overwritten.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "experiments"
CACHE = Path(os.environ.get("LORAKIT_EXPERIMENTS_CACHE") or Path.home() / ".cache" / "lorakit" / "experiments")
"""Trained adapters and finished runs (never inside the repository)."""


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny budgets (CI, a minute or two)")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for the .md/.png (default: docs/experiments/; required with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: nproc)")
    return p


def out_dir(args: argparse.Namespace) -> Path:
    """The output directory; --quick without --out refuses to touch the committed full outputs."""
    if args.out is None:
        if args.quick:
            raise SystemExit("--quick needs --out DIR (quick outputs must not overwrite docs/experiments/)")
        out = DOCS
    else:
        out = args.out
    out.mkdir(parents=True, exist_ok=True)
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def provenance(threads: int) -> str:
    """Markdown lines: exact command, machine, date, software versions, load at start."""
    import torch
    import transformers

    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    return "\n".join([
        f"- command: `{command}`",
        f"- machine: {os.cpu_count()} CPU cores (`nproc`), {cpu_model()}, torch threads {threads}; "
        f"load average at start {load} (a shared machine: absolute times are noisy, ratios less so)",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
    ])


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def set_threads(args: argparse.Namespace) -> int:
    import torch

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads


def pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
