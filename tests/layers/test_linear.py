"""Golden values for one hand-computed Linear and GPT-2 Conv1D case, init rules and dtypes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.layers import GPT2Conv1D, Linear

# W0 (d=2, k=3), bias, A (r=1, k), B (d, r), α=2 → s = α/r = 2, x = (1, 2, 3).
W0 = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])
BIAS = torch.tensor([0.5, -0.5])
A = torch.tensor([[1.0, 1.0, 0.0]])
B = torch.tensor([[2.0], [-1.0]])
X = torch.tensor([[1.0, 2.0, 3.0]])
# By hand: W0·x + b = (7.5, -1.5); A·x = 3; s·B·(A·x) = (12, -6) → h = (19.5, -7.5).
GOLDEN_OUT = torch.tensor([[19.5, -7.5]])
GOLDEN_DELTA = torch.tensor([[4.0, 4.0, 0.0], [-2.0, -2.0, 0.0]])  # s·B·A


def _golden_layer(kind: str) -> nn.Module:
    if kind == "linear":
        base = nn.Linear(3, 2)
        base.weight.data.copy_(W0)
        layer: nn.Module = Linear(base)
    else:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(2, 3)
        base.weight.data.copy_(W0.t())  # Conv1D stores (in, out)
        layer = GPT2Conv1D(base)
    base.bias.data.copy_(BIAS)
    layer.update_layer("default", r=1, lora_alpha=2, lora_dropout=0.0, init_lora_weights=True, use_rslora=False)
    layer.lora_A["default"].weight.data.copy_(A)
    layer.lora_B["default"].weight.data.copy_(B)
    layer.active_adapters = ["default"]
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_golden_forward_delta_and_merge(kind: str) -> None:
    layer = _golden_layer(kind)
    torch.testing.assert_close(layer(X), GOLDEN_OUT, atol=0, rtol=0)
    expected_delta = GOLDEN_DELTA if kind == "linear" else GOLDEN_DELTA.t()  # fan_in_fan_out: ΔWᵀ
    torch.testing.assert_close(layer.delta_weight("default"), expected_delta, atol=0, rtol=0)
    layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, (W0 + GOLDEN_DELTA) if kind == "linear" else (W0 + GOLDEN_DELTA).t())
    torch.testing.assert_close(layer(X), GOLDEN_OUT, atol=0, rtol=0)  # merged: the base alone gives it
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W0 if kind == "linear" else W0.t(), atol=0, rtol=0)


def test_rslora_scaling() -> None:
    layer = Linear(nn.Linear(4, 4))
    layer.update_layer("a", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=True, use_rslora=True)
    layer.update_layer("b", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=True, use_rslora=False)
    assert layer.scaling == {"a": 4.0, "b": 2.0}


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_init_b_zero_a_random(init: bool | str) -> None:
    layer = Linear(nn.Linear(64, 32))
    layer.update_layer("default", r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=init, use_rslora=False)
    a, b = layer.factors("default")
    assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) == a.numel()
    if init == "gaussian":  # PEFT's convention: std 1/r
        assert abs(a.std().item() - 1 / 8) < 0.02


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_pissa_olora_keep_output(init: str, kind: str) -> None:
    if kind == "linear":
        base: nn.Module = nn.Linear(16, 12)
        layer: nn.Module = Linear(base)
    else:
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(12, 16)
        nn.init.normal_(base.weight, std=0.2)
        layer = GPT2Conv1D(base)
    x = torch.randn(5, 16)
    before = base(x).detach()
    w0 = base.weight.detach().clone()
    layer.update_layer("default", r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=init, use_rslora=False)
    layer.active_adapters = ["default"]
    assert not torch.equal(base.weight, w0)  # W0 was adjusted
    assert torch.count_nonzero(layer.factors("default")[1]) > 0  # B carries the principal part
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_fp32_adapter(dtype: torch.dtype) -> None:
    layer = Linear(nn.Linear(8, 4).to(dtype))
    layer.update_layer("default", r=2, lora_alpha=4, lora_dropout=0.0, init_lora_weights=False, use_rslora=False)
    layer.active_adapters = ["default"]
    a, b = layer.factors("default")
    assert a.dtype == torch.float32 and b.dtype == torch.float32
    x = torch.randn(3, 8).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    expected = layer.base_layer(x).float() + (x.float() @ a.t() @ b.t()) * 2.0
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
