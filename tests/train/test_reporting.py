"""Logging backends (train/reporting.py) and what a run with --eval-every reports: held-out loss and accuracy
in metrics.jsonl and TensorBoard, peak memory in metrics.jsonl and summary.json, both curves in loss.png."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_model_dir

from lorakit.cli import main
from lorakit.train.reporting import Reporting, check_backends


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_jsonl_and_tensorboard_get_the_same_records(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra (in dev) is not installed")
    reporting = Reporting(tmp_path, ["tensorboard"], enabled=True, append=False)
    reporting.write(step=5, loss=1.25, lr=1e-3)
    reporting.write(step=5, split="heldout", phase="during", accuracy=0.75, loss=0.5)
    reporting.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 5, "loss": 1.25, "lr": 1e-3},
                    {"step": 5, "split": "heldout", "phase": "during", "accuracy": 0.75, "loss": 0.5}]
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [(5, 1.25)] and scalars["heldout/accuracy"] == [(5, 0.75)]
    assert scalars["heldout/loss"] == [(5, 0.5)]


def test_disabled_reporting_writes_nothing(tmp_path: Path) -> None:
    reporting = Reporting(tmp_path / "out", ["tensorboard"], enabled=False, append=False)
    reporting.write(step=1, loss=1.0)
    reporting.close()
    assert not (tmp_path / "out").exists()


def test_backend_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    check_backends([])
    with pytest.raises(ValueError, match=r"--report-to 'mlflow' is not a logging backend: use tensorboard"):
        check_backends(["mlflow"])
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ValueError, match=r"pip install 'lorakit\[tensorboard\]'"):
        check_backends(["tensorboard"])


@pytest.mark.slow
def test_eval_every_run_reports_heldout_loss_accuracy_and_peak_memory(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra (in dev) is not installed")
    model_dir = save_tiny_model_dir(tmp_path / "model", "llama")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"is {w} short ->", "completion": "Y" if len(w) < 4 else "N"})
                            + "\n" for w in ["cat", "dog", "lamp", "rose", "sun", "moon", "fig", "bird"] * 4))
    out = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--max-steps",
                 "4", "--batch-size", "4", "--lr", "1e-2", "--samples", "0", "--no-progress", "--threads", "1",
                 "--eval-every", "2", "--log-every", "1", "--gradient-checkpointing", "--report-to", "tensorboard",
                 "--no-eval-cache"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    heldout = [r for r in rows if r.get("split") == "heldout"]
    assert [(r["step"], r["phase"]) for r in heldout] == [(0, "before"), (2, "during"), (4, "after")]
    assert all("accuracy" in r and r["loss"] > 0 for r in heldout)
    train_rows = [r for r in rows if "split" not in r]
    assert len(train_rows) == 4 and all(r["peak_memory_bytes"] > 10_000_000 for r in train_rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["peak_memory_bytes"] >= train_rows[-1]["peak_memory_bytes"]
    assert summary["options"]["gradient_checkpointing"] is True and "best_step" in summary
    assert (out / "loss.png").stat().st_size > 0 and not (out / "last").exists()
    scalars = _scalars(out / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [s for s, _ in scalars["heldout/accuracy"]] == [0, 2, 4]
