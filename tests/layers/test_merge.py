"""Blocked in-place merge: bit-exact unmerge across many row blocks, with the sparse exception path used."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyNet, make_gpt2, randomize_lora

from lorakit import LoraConfig, get_peft_model
from lorakit.layers import base as layer_base

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_merge_is_bit_exact_with_exceptions(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    # Tiny blocks: every weight is merged in many row blocks, some of a single row.
    monkeypatch.setattr(layer_base, "_BLOCK_ELEMENTS", 40)
    model = ToyNet(vocab=20, dim=6).to(dtype)
    with torch.no_grad():  # weights near 0: a large ΔW flips signs, which the int8 residual cannot hold
        model.mlp.weight.mul_(1e-3)
        model.emb.weight.mul_(1e-3)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "conv1d", "mlp"],
                                            init_lora_weights=False))
    peft.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["mlp", "emb"],
                                          init_lora_weights=False))
    randomize_lora(peft, std=0.5)
    before = _weights(peft)
    peft.merge_adapter(["default", "second"])
    mlp = peft.base_model.model.mlp
    assert mlp._unmerge_residual["default"].index.numel() > 0  # the exception path really ran
    assert not torch.equal(mlp.base_layer.weight, before["base_model.model.mlp.base_layer.weight"])
    peft.unmerge_adapter()
    after = _weights(peft)
    assert [k for k in before if not torch.equal(before[k], after[k])] == []


def test_blocked_merge_matches_delta_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Merged weights equal W0 + ΔW (computed whole) for Linear, GPT-2 Conv1D and Embedding, in many blocks."""
    monkeypatch.setattr(layer_base, "_BLOCK_ELEMENTS", 100)
    model = make_gpt2(n_embd=32)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "wte", "c_fc"],
                                            init_lora_weights=False))
    randomize_lora(peft, std=0.3)
    layers = [m for m in peft.modules() if isinstance(m, layer_base.LoraLayer)]
    expected = [layer.base_layer.weight.detach() + layer.delta_weight("default") for layer in layers]
    peft.merge_adapter()
    for layer, want in zip(layers, expected, strict=True):
        torch.testing.assert_close(layer.base_layer.weight.detach(), want, atol=1e-6, rtol=1e-6)
        # the non-mutating unmerged view used by the fingerprint equals what unmerge gives
        view = layer.unmerged_weight()
        layer.unmerge()
        assert torch.equal(view, layer.base_layer.weight.detach())
