"""Early stopping: the rule (train/early_stopping.py), and a run driven by a forced metric sequence that must
stop at a known step, keep that step's adapter bit for bit, and stop the same way after a resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import save_tiny_model_dir
from safetensors.torch import load_file

import lorakit.train.loop as loop
from lorakit import PeftModel
from lorakit.cli import main
from lorakit.train.early_stopping import EarlyStopping
from lorakit.train.loop import load_causal_lm


def test_the_rule_higher_or_lower_is_better_and_ties_do_not_improve() -> None:
    stopper = EarlyStopping("accuracy", patience=2)
    verdicts = [stopper.update(step, {"accuracy": a}) for step, a in [(1, 0.5), (2, 0.6), (3, 0.6), (4, 0.55)]]
    assert verdicts == [True, True, False, False] and stopper.best_step == 2 and stopper.should_stop
    loss = EarlyStopping("loss", patience=1)
    assert loss.update(1, {"loss": 2.0}) and loss.update(2, {"loss": 1.5}) and not loss.update(3, {"loss": 1.7})
    assert loss.should_stop and loss.best == 1.5
    never = EarlyStopping("perplexity")
    for step in range(5):
        never.update(step, {"perplexity": 10.0})
    assert not never.should_stop  # patience 0: never stops
    restored = EarlyStopping("accuracy", patience=2)
    restored.load_state_dict(stopper.state_dict())
    assert restored == stopper
    with pytest.raises(ValueError, match=r"--early-stopping-metric=accuracy is not measured on this task"):
        EarlyStopping("accuracy").update(1, {"loss": 1.0, "perplexity": 2.7})


# Held-out accuracy after steps 2, 4, 6, 8 (the first value is the before-training evaluation): the best is
# step 4; steps 6 and 8 do not beat it, so with patience 2 the run stops after step 8 of 20.
ACCURACY = [0.50, 0.60, 0.70, 0.65, 0.68, 0.90, 0.95]


def _forced_evaluate(start: int) -> Any:
    calls = [start]

    def evaluate(model: Any, tokenizer: Any, task: Any, opts: Any, with_loss: bool = False) -> dict[str, float]:
        value = ACCURACY[calls[0]]
        calls[0] += 1
        return {"accuracy": value, "n": 20, "stderr": 0.1, "loss": 1.0 - value}

    return evaluate


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("early")
    model_dir = save_tiny_model_dir(root / "model", "llama")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"is {w} short ->", "completion": "Y" if len(w) < 4 else "N"})
                            + "\n" for w in ["cat", "dog", "lamp", "rose", "sun", "moon", "fig", "bird"] * 4))
    return model_dir, data


def _argv(files: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    model_dir, data = files
    return ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--max-steps", "20",
            "--batch-size", "4", "--lr", "1e-2", "--lora-dropout", "0.1", "--samples", "0", "--no-progress",
            "--threads", "1", "--eval-every", "2", "--early-stopping-patience", "2", "--early-stopping-metric",
            "accuracy", "--save-every", "1", "--keep-checkpoints", "20", "--log-every", "1", "--no-eval-cache",
            *extra]


def _trainable_of(adapter: Path, model_dir: Path) -> dict[str, torch.Tensor]:
    base, _ = load_causal_lm(model_dir)
    model = PeftModel.from_pretrained(base, adapter)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() and got
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_stops_at_the_known_step_keeps_the_best_adapter_and_resumes_the_same(
        files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = files[0]
    out = tmp_path / "unbroken"
    monkeypatch.setattr(loop, "evaluate", _forced_evaluate(0))
    assert main(_argv(files, out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["planned_steps"] == 20 and summary["best_step"] == 4
    assert summary["after"]["accuracy"] == 0.70 and summary["last"]["accuracy"] == 0.68
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints[-1] == "step-000008"  # nothing trained after the stop

    # adapter/ is bit for bit the adapter after step 4 (its checkpoint), last/ the one after step 8.
    step4 = load_file(str(out / "checkpoints" / "step-000004" / "trainable.safetensors"))
    step8 = load_file(str(out / "checkpoints" / "step-000008" / "trainable.safetensors"))
    _assert_identical(_trainable_of(out / "adapter", model_dir), step4)
    _assert_identical(_trainable_of(out / "last", model_dir), step8)
    assert not torch.equal(next(iter(step4.values())), next(iter(step8.values())))

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    during = [(r["step"], r["accuracy"]) for r in rows if r.get("phase") == "during"]
    assert during == [(2, 0.60), (4, 0.70), (6, 0.65), (8, 0.68)]
    assert (out / "loss.png").stat().st_size > 0

    # Resume from the checkpoint after step 3 (best so far: step 2): evaluations 4, 6, 8 come next.
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints", resumed / "checkpoints")
    for name in ("step-000004", "step-000005", "step-000006", "step-000007", "step-000008"):
        shutil.rmtree(resumed / "checkpoints" / name)
    monkeypatch.setattr(loop, "evaluate", _forced_evaluate(2))
    assert main(_argv(files, resumed, "--resume", str(resumed / "checkpoints" / "step-000003"))) == 0
    again = json.loads((resumed / "summary.json").read_text())
    assert again["steps"] == 8 and again["best_step"] == 4 and again["before"] == summary["before"]
    for name in ("adapter", "last"):
        _assert_identical(_trainable_of(resumed / name, model_dir), _trainable_of(out / name, model_dir))


def test_resume_keeps_a_best_adapter_from_before_the_checkpoint(
        files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The best evaluation (step 4) lies before the checkpoint resumed from (step 6): its tensors travel in the
    checkpoint, so adapter/ is still step 4's."""
    out = tmp_path / "first"
    monkeypatch.setattr(loop, "evaluate", _forced_evaluate(0))
    assert main(_argv(files, out, "--max-steps", "7")) == 0  # runs to the end: 7 steps, best at 4
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "step-000007")
    monkeypatch.setattr(loop, "evaluate", _forced_evaluate(4))  # after step 7 (the end): 0.68 < 0.70
    assert main(_argv(files, resumed, "--max-steps", "7", "--resume", "latest")) == 0
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["best_step"] == 4 and summary["steps"] == 7
    step4 = load_file(str(out / "checkpoints" / "step-000004" / "trainable.safetensors"))
    _assert_identical(_trainable_of(resumed / "adapter", files[0]), step4)
