"""The before-training evaluation cache: reused for the same base and settings, recomputed when either changes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import save_tiny_model_dir

import lorakit.train.loop as loop
from lorakit.cli import main


@pytest.fixture()
def counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, list[bool]]:
    """A tiny model and data set, a private lorakit cache, and one entry per evaluation that really ran."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    model_dir = save_tiny_model_dir(tmp_path / "model", "llama")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"is {w} short ->", "completion": "Y" if len(w) < 4 else "N"})
                            + "\n" for w in ["cat", "dog", "lamp", "rose", "sun", "moon", "fig", "bird"] * 2))
    ran: list[bool] = []
    real = loop.evaluate

    def evaluate(model: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
        ran.append(True)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", evaluate)
    return model_dir, data, ran


def _train(model_dir: Path, data: Path, out: Path, *extra: str) -> dict[str, Any]:
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--max-steps",
                 "1", "--batch-size", "4", "--samples", "0", "--no-progress", "--threads", "1", *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def test_a_second_run_reads_the_before_evaluation_and_a_quantized_base_does_not(
        counted: tuple[Path, Path, list[bool]], tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="the [quant] extra (bitsandbytes) is part of [dev]")
    model_dir, data, ran = counted
    first = _train(model_dir, data, tmp_path / "a")
    assert len(ran) == 2  # before and after
    second = _train(model_dir, data, tmp_path / "b")
    assert len(ran) == 3 and second["before"] == first["before"]  # before came from the cache
    # A quantized base scores differently: its before-training evaluation must run (it once read the fp32 one).
    _train(model_dir, data, tmp_path / "c", "--quantize", "nf4")
    assert len(ran) == 5
    _train(model_dir, data, tmp_path / "d", "--quantize", "int8")
    assert len(ran) == 7
