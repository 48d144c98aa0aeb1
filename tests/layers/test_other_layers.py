"""Embedding and Conv1d/Conv2d layers: delta_weight agrees with the LoRA branch, merge agrees with forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit.layers import Conv, Embedding


def _activate(layer: nn.Module) -> None:
    layer.update_layer("default", r=3, lora_alpha=6, lora_dropout=0.0, init_lora_weights=False, use_rslora=False)
    layer.active_adapters = ["default"]


def test_embedding_delta_and_merge() -> None:
    layer = Embedding(nn.Embedding(11, 5))
    _activate(layer)
    ids = torch.tensor([[1, 4, 10], [0, 0, 3]])
    out = layer(ids)
    expected = nn.functional.embedding(ids, layer.base_layer.weight + layer.delta_weight("default"))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    a, b = layer.factors("default")
    assert a.shape == (3, 11) and b.shape == (5, 3)  # PEFT's (r, vocab), (dim, r)
    layer.merge()
    torch.testing.assert_close(layer(ids), out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("conv", [nn.Conv1d(4, 6, 3, padding=1), nn.Conv2d(4, 6, (3, 2), stride=2, padding=1)])
def test_conv_delta_matches_branch(conv: nn.Module) -> None:
    layer = Conv(conv)
    _activate(layer)
    x = torch.randn(2, 4, 9) if isinstance(conv, nn.Conv1d) else torch.randn(2, 4, 9, 7)
    out = layer(x)
    functional = nn.functional.conv1d if isinstance(conv, nn.Conv1d) else nn.functional.conv2d
    expected = functional(x, conv.weight + layer.delta_weight("default"), conv.bias, conv.stride, conv.padding)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(x), out, atol=1e-5, rtol=1e-5)
