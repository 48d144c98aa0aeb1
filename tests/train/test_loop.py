"""lorakit train on a user's own small model and data: loss falls, adapter loads, kill + resume is exact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model_dir
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.train.loop import load_causal_lm, sequence_mean_loss
from lorakit.train.options import TrainOptions

WORDS = ["cat", "dog", "sun", "bird", "sky", "lamp", "pen", "rose", "cup", "moon", "fig", "jam"]


def _write_data(directory: Path, kind: str) -> Path:
    pairs = [(w, w.upper()) for w in WORDS] * 4
    if kind == "jsonl":
        path = directory / "data.jsonl"
        # A labelled task (two single-token labels) → scored by accuracy.
        path.write_text("".join(json.dumps({"prompt": f"is {a} short ->", "completion": "Y" if len(a) < 4 else "N"})
                                + "\n" for a, _ in pairs + [("ox", ""), ("bee", ""), ("gnu", ""), ("elk", "")]))
    elif kind == "csv":
        path = directory / "data.csv"
        path.write_text("instruction,input,output\n" + "".join(f"upper case,{a},{b}\n" for a, b in pairs))
    else:
        path = directory / "data.txt"
        path.write_text("".join(f"the {a} is {b} and the {b} is {a}.\n" for a, b in pairs))
    return path


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "split" not in r]


@pytest.mark.parametrize(("arch", "kind"), [("llama", "jsonl"), ("gpt2", "csv"), ("llama", "txt")])
def test_train_on_user_files(tmp_path: Path, arch: str, kind: str) -> None:
    model_dir = save_tiny_model_dir(tmp_path / "model", arch)
    data = _write_data(tmp_path, kind)
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            str(model_dir),
            "--data",
            str(data),
            "--output-dir",
            str(out),
            "--max-steps",
            "30",
            "--lr",
            "3e-2", "--target-modules", "all-linear",
            "--batch-size",
            "8",
            "--log-every",
            "1",
            "--warmup-steps",
            "0",
            "--samples",
            "1",
            "--no-progress",
            "--r",
            "4",
        ]
    )
    assert code == 0
    losses = _losses(out)
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2
    summary = json.loads((out / "summary.json").read_text())
    assert ("accuracy" in summary["after"]) == (kind == "jsonl")
    assert (out / "loss.png").stat().st_size > 1000

    from lorakit import PeftModel

    base, _ = load_causal_lm(model_dir)
    loaded = PeftModel.from_pretrained(base, str(out / "adapter"))
    b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert b and all(torch.count_nonzero(p) > 0 for p in b)


def test_options_file_and_flag_override(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"r": 4, "lora-alpha": 8, "max_steps": 3}))
    opts = TrainOptions.from_file(config, overrides={"r": 2})
    assert (opts.r, opts.lora_alpha, opts.max_steps) == (2, 8, 3)
    config.write_text(json.dumps({"rank": 4}))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rank'\]"):
        TrainOptions.from_file(config)


def test_sequence_mean_loss_weighs_sequences_equally() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, 1, 2, 3, 4], [-100, -100, -100, -100, 6]])
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="none"
    ).view(2, 4)
    expected = (per_token[0, :].mean() + per_token[1, 3]) / 2
    torch.testing.assert_close(sequence_mean_loss(logits, labels), expected)


def _adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_kill_and_resume_gives_the_same_adapter(tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir(tmp_path / "model", "llama")
    data = _write_data(tmp_path, "jsonl")
    common = [
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--max-steps",
        "60",
        "--lr",
        "5e-3",
        "--batch-size",
        "4",
        "--lora-dropout",
        "0.1",
        "--samples",
        "0",
        "--no-progress",
        "--r",
        "4",
        "--save-every",
        "3",
        "--threads",
        "1",
    ]
    assert main(["train", *common, "--output-dir", str(tmp_path / "unbroken")]) == 0

    broken = tmp_path / "broken"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "train", *common, "--output-dir", str(broken)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list((broken / "checkpoints").glob("step-*")):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (broken / "summary.json").exists(), "the run finished before it could be killed"
    assert main(["train", *common, "--output-dir", str(broken), "--resume", "latest"]) == 0

    expected, got = _adapter_tensors(tmp_path / "unbroken"), _adapter_tensors(broken)
    assert expected.keys() == got.keys()
    for key in expected:
        # Equal up to float rounding: BLAS kernels may round differently across processes (memory alignment).
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)
