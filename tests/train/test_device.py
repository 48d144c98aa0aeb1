"""--device and --dtype/--autocast resolution (train/device.py), CPU autocast training, and the CUDA checks
that run only where a GPU exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_llama, randomize_lora, save_tiny_model_dir

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.cli import main
from lorakit.train.device import Precision, peak_memory_bytes, resolve_device

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_cpu_and_auto_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gpus(monkeypatch, 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


def test_auto_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gpus(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    _fake_gpus(monkeypatch, 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")


def test_cuda_index_and_torchrun_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_gpus(monkeypatch, 2)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\).*index below 2"):
        resolve_device("cuda:2")
    with pytest.raises(ValueError, match=r"under torchrun each process takes the GPU of its LOCAL_RANK"):
        resolve_device("cuda:0", local_rank=1)


@pytest.mark.parametrize(("spec", "pattern"), [
    ("cuda", r"--device cuda: CUDA is not available here.*use --device cpu"),
    ("cuda:0", r"--device cuda:0: CUDA is not available here"),
    ("mps", r"--device mps: the MPS .* not available.*use --device cpu"),
    ("tpu", r"--device 'tpu' is not a device: use auto, cpu, cuda, cuda:N or mps"),
    ("cuda:x", r"--device 'cuda:x' is not a device"),
])
def test_unavailable_or_unknown_devices(monkeypatch: pytest.MonkeyPatch, spec: str, pattern: str) -> None:
    _fake_gpus(monkeypatch, 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=pattern):
        resolve_device(spec)


def test_precision_regimes() -> None:
    cpu = torch.device("cpu")
    plain = Precision.resolve("float32", False, cpu)
    assert plain.autocast_dtype is None and not plain.uses_scaler and not plain.grad_scaler().is_enabled()
    bf16 = Precision.resolve("float32", True, cpu)
    assert bf16.autocast_dtype == torch.bfloat16 and not bf16.uses_scaler
    assert bf16.describe() == "float32 base, bfloat16 autocast, float32 adapters"
    with bf16.autocast():
        assert torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match=r"--autocast with --dtype float16 on cpu.*--dtype float32 --autocast"):
        Precision.resolve("float16", True, cpu)
    fp16 = Precision.resolve("float16", True, torch.device("cuda", 0))
    assert fp16.autocast_dtype == torch.float16 and fp16.uses_scaler


def test_peak_memory_is_the_rss_high_water_mark_on_cpu() -> None:
    import resource

    assert peak_memory_bytes(torch.device("cpu")) == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_bf16_autocast_step_keeps_float32_adapters_and_gradients() -> None:
    """Under CPU bf16 autocast the forward runs in bf16 (the plain autograd LoRA path) while the factors, their
    gradients and AdamW's state stay float32, and the gradients agree with fp32's to bf16 accuracy."""
    model = get_peft_model(make_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    ids = torch.randint(0, 64, (2, 12))
    grads = {}
    for regime in ("float32", "bf16"):
        model.zero_grad(set_to_none=True)
        precision = Precision.resolve("float32", regime == "bf16", torch.device("cpu"))
        with precision.autocast():
            logits = model(input_ids=ids).logits
        assert logits.dtype == (torch.bfloat16 if regime == "bf16" else torch.float32)
        torch.nn.functional.cross_entropy(logits.float()[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)).backward()
        grads[regime] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads["bf16"].items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, grads["float32"][name], atol=2e-2, rtol=5e-2, msg=name)


def _train_tiny(tmp_path: Path, *extra: str) -> Path:
    model_dir = save_tiny_model_dir(tmp_path / "model", "llama")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"is {w} short ->", "completion": " Y" if len(w) < 4 else " N"})
                            + "\n" for w in ["cat", "dog", "lamp", "rose", "sun", "moon", "fig", "bird"] * 4))
    out = tmp_path / "run"
    code = main(["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--max-steps",
                 "5", "--batch-size", "4", "--lr", "1e-2", "--samples", "0", "--no-progress", "--threads", "1",
                 "--no-eval-cache", *extra])
    assert code == 0
    return out


def test_cpu_bf16_autocast_run_trains_and_saves_float32_adapter(tmp_path: Path) -> None:
    out = _train_tiny(tmp_path, "--device", "cpu", "--autocast")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and "bfloat16 autocast" in summary["precision"]
    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    assert any(bool(t.any()) for k, t in tensors.items() if "lora_B" in k)


# ------------------------------------------------------------------------------------------------ CUDA only
@CUDA
@pytest.mark.slow
def test_cuda_bf16_autocast_run_reloads_on_cpu_with_equal_logits(tmp_path: Path) -> None:
    out = _train_tiny(tmp_path, "--device", "cuda", "--autocast", "--log-every", "1")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r and "split" not in r]
    assert losses[-1] < losses[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["peak_memory_bytes"] > 0
    from lorakit.train.loop import load_causal_lm

    base, _ = load_causal_lm(tmp_path / "model")
    cpu_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = torch.randint(3, 60, (2, 10))
    with torch.no_grad():
        on_cpu = cpu_model(input_ids=ids).logits
        gpu_model = cpu_model.to("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            on_gpu = gpu_model(input_ids=ids.cuda()).logits.float().cpu()
    torch.testing.assert_close(on_gpu, on_cpu, atol=5e-2, rtol=5e-2)


@CUDA
def test_fused_op_gradients_on_cuda_equal_autograd() -> None:
    from lorakit.ops import lora_linear

    torch.manual_seed(0)
    x = torch.randn(6, 16, device="cuda", requires_grad=True)
    weight, bias = torch.randn(24, 16, device="cuda"), torch.randn(24, device="cuda")
    a = torch.randn(4, 16, device="cuda", requires_grad=True)
    b = torch.randn(24, 4, device="cuda", requires_grad=True)
    fused = lora_linear(x, weight, bias, False, [(a, b, 0.5, 0.0)])
    grads = torch.autograd.grad(fused.square().sum(), (x, a, b))
    reference = x @ weight.T + bias + 0.5 * (x @ a.T) @ b.T
    expected = torch.autograd.grad(reference.square().sum(), (x, a, b))
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
