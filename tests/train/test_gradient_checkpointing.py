"""--gradient-checkpointing: transformers' non-reentrant checkpointing with lorakit's fused LoRA op gives the
un-checkpointed gradients, reaches every LoRA factor (the guard stays silent) and saves fewer activations."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_llama, randomize_lora
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.guards import check_lora_gradients
from lorakit.train.loop import enable_gradient_checkpointing


def _lora_llama(dropout: float) -> nn.Module:
    model = get_peft_model(make_llama(n_layer=3), LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout))
    randomize_lora(model)  # B ≠ 0: A's gradient is not trivially zero
    return model.train()


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _saved_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for backward outside any checkpointed region (each storage once, parameters
    excluded) — deterministic, unlike RSS."""
    kept = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in kept:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = _loss(model, ids)
    loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointed_gradients_equal_plain_ones(dropout: float) -> None:
    plain = _lora_llama(dropout)
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed.get_base_model())
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    ids = torch.randint(0, 64, (3, 16))
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(7)  # the same dropout masks (checkpointing replays the RNG state on recompute)
        _loss(model, ids).backward()
        check_lora_gradients(model)  # every factor got a gradient: the guard stays silent
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 3 * 7 * 2
    for name, grad in grads[0].items():
        assert grad is not None and bool(grad.any()), name
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=0, msg=name)


def test_checkpointing_saves_fewer_activation_bytes() -> None:
    plain = _lora_llama(0.0)
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed.get_base_model())
    ids = torch.randint(0, 64, (4, 32))
    full, reduced = _saved_bytes(plain, ids), _saved_bytes(checkpointed, ids)
    # Each of the 3 blocks keeps only its input (plus the head's inputs): well under half.
    assert reduced < 0.5 * full, (reduced, full)


def test_a_model_without_checkpointing_support_is_refused() -> None:
    with pytest.raises(ValueError, match=r"--gradient-checkpointing: Linear does not support .*drop the flag"):
        enable_gradient_checkpointing(nn.Linear(2, 2))
