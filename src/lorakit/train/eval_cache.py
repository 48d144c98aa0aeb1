"""The before-training evaluation, remembered: the same base model files, held-out records and evaluation
settings always give the same numbers, so a second run (a sweep over learning rates, ranks, seeds) reads
them from ``<cache_dir>/evaluations/<key>.json`` instead of running the base model over the held-out split
again (on the default task that is ~40 % of a 30-step run on a CPU).

The key is a sha256 over: every file of the model directory (name, size, modification time), the held-out
records and label words, and each setting the numbers depend on (max length, evaluation batch, dtype,
quantization, autocast, device type, whether the loss is measured, chat rendering and masking). A changed or replaced file changes the key; a model
passed in as an object (not a directory) is never cached. A cache file that cannot be read is ignored and
rewritten; writes are atomic (a temporary file renamed into place).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def evaluation_key(model_dir: Path, heldout: list[dict[str, str]], labels: list[str] | None,
                   settings: dict[str, Any]) -> str:
    """sha256 hex digest naming one before-training evaluation."""
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    for path in files:
        info = path.stat()
        digest.update(f"{path.relative_to(model_dir)}:{info.st_size}:{info.st_mtime_ns}\n".encode())
    digest.update(json.dumps({"heldout": heldout, "labels": labels, "settings": settings},
                             sort_keys=True).encode())
    return digest.hexdigest()


def _path(key: str) -> Path:
    from .defaults import cache_dir

    return cache_dir() / "evaluations" / f"{key}.json"


def load_evaluation(key: str) -> dict[str, float] | None:
    """The cached metrics for ``key``, or None (absent or unreadable)."""
    try:
        data = json.loads(_path(key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def store_evaluation(key: str, metrics: dict[str, float]) -> None:
    """Write ``metrics`` under ``key``; a cache that cannot be written is skipped (it only saves time)."""
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(metrics, handle)
        os.replace(staging, path)
    except OSError:
        pass
