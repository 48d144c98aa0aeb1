"""Where a run's metrics go: ``metrics.jsonl`` always, plus the backends named by ``--report-to``.

One small interface, ``Reporter``: ``write(record)`` for each metrics record (the dict that becomes one
JSONL line: ``step`` plus numbers, and ``split``/``phase`` for held-out evaluations) and ``close()``. The
JSONL file is the always-on record (``loss.png`` and resuming read it); ``tensorboard`` adds scalars through
``torch.utils.tensorboard`` under ``<output_dir>/tensorboard`` (tags ``train/loss``, ``heldout/accuracy`` …).
Adding a backend is one class with those two methods and one entry in ``BACKENDS``; no service is started.
Only rank 0 reports.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol


class Reporter(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlReporter:
    """metrics.jsonl writer; each line is flushed so a crash keeps what was logged."""

    def __init__(self, path: Path, append: bool) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


class TensorBoardReporter:
    """Scalars for TensorBoard: every number of a record under ``<split or train>/<name>`` at its step."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict[str, Any]) -> None:
        prefix = record.get("split", "train")
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{name}", value, global_step=int(record["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _tensorboard_available() -> str | None:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return "the tensorboard package is not installed; pip install 'lorakit[tensorboard]' (or pip install tensorboard)"
    return None


BACKENDS: dict[str, tuple[Callable[[], str | None], Callable[[Path], Reporter]]] = {
    "tensorboard": (_tensorboard_available, lambda out: TensorBoardReporter(out / "tensorboard")),
}
"""name → (check: None if usable else why not, factory taking the output directory)."""


def check_backends(names: list[str]) -> None:
    """Raise before anything is written if a named backend is unknown or cannot run here.

    Raises:
        ValueError: naming the backend and the fix (e.g. the pip extra to install).
    """
    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"--report-to {name!r} is not a logging backend: use {', '.join(BACKENDS)} "
                             "(metrics.jsonl is always written).")
        problem = BACKENDS[name][0]()
        if problem is not None:
            raise ValueError(f"--report-to {name}: {problem}.")


class Reporting:
    """Fan-out to metrics.jsonl and the chosen backends (a no-op on ranks other than 0)."""

    def __init__(self, out: Path, names: list[str], enabled: bool, append: bool) -> None:
        self.reporters: list[Reporter] = []
        if enabled:
            self.reporters.append(JsonlReporter(out / "metrics.jsonl", append))
            self.reporters += [BACKENDS[name][1](out) for name in names]

    def write(self, **record: Any) -> None:
        for reporter in self.reporters:
            reporter.write(record)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()
