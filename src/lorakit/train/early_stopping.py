"""Early stopping on a held-out metric, and which evaluation was the best.

After each ``--eval-every`` evaluation, ``EarlyStopping.update(step, metrics)`` compares the metric with the
best so far: higher is better for ``accuracy``, lower for ``loss`` and ``perplexity``. An evaluation improves
only if it is strictly better than the best (ties keep the earlier, cheaper adapter). The run stops once
``patience`` evaluations in a row have not improved. The state is three numbers, kept in checkpoints, so a
resumed run stops at the same step as an unbroken one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

HIGHER_IS_BETTER = {"accuracy": True, "loss": False, "perplexity": False}
METRICS = tuple(HIGHER_IS_BETTER)


@dataclass
class EarlyStopping:
    """Best value of ``metric`` seen so far, at which step, and evaluations since it improved.

    ``patience`` 0 never stops (the best step is still tracked, so ``adapter/`` is the best one).
    """

    metric: str
    patience: int = 0
    best: float | None = None
    best_step: int | None = None
    bad_evaluations: int = 0

    def __post_init__(self) -> None:
        if self.metric not in HIGHER_IS_BETTER:
            raise ValueError(f"--early-stopping-metric={self.metric!r} is invalid: use one of {', '.join(METRICS)}.")

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Record the evaluation after optimizer step ``step``; True if it is the new best.

        Raises:
            ValueError: ``metrics`` lacks the metric (e.g. accuracy asked for an unlabelled task).
        """
        if self.metric not in metrics:
            raise ValueError(f"--early-stopping-metric={self.metric} is not measured on this task (the evaluation "
                             f"gives {', '.join(k for k in METRICS if k in metrics)}); choose one of those.")
        value = float(metrics[self.metric])
        improved = self.best is None or (value > self.best if HIGHER_IS_BETTER[self.metric] else value < self.best)
        if improved:
            self.best, self.best_step, self.bad_evaluations = value, step, 0
        else:
            self.bad_evaluations += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evaluations >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.bad_evaluations = int(state.get("bad_evaluations", 0))
