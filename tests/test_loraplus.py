"""LoRA+ optimizer: the same parameter groups and learning rates as PEFT 0.21's create_loraplus_optimizer."""

from __future__ import annotations

import pytest
import torch
from conftest import make_gpt2, make_llama
from torch import nn

from lorakit import LoraConfig, create_loraplus_optimizer, get_peft_model

CONFIGS = {
    # GPT-2: LayerNorms (no decay), biases, an Embedding adapter (its own lr), modules_to_save.
    "gpt2-bias-all": (make_gpt2, dict(target_modules=["c_attn", "c_fc", "wte"], bias="all")),
    "gpt2-saved-norm": (make_gpt2, dict(target_modules=["c_attn", "wte"], modules_to_save=["ln_f"])),
    "gpt2-lora-only-bias": (make_gpt2, dict(target_modules=["c_attn", "c_proj"], bias="lora_only")),
    # Llama: RMSNorm is not in PEFT's no-decay list, so a saved norm's weight decays.
    "llama-all-linear": (make_llama, dict(target_modules="all-linear", modules_to_save=["model.norm"])),
}


def _groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[float, float, list[str]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in optimizer.param_groups]


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_groups_and_lrs_equal_peft(case: str) -> None:
    import peft
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    make, kwargs = CONFIGS[case]
    ours = get_peft_model(make(), LoraConfig(r=4, lora_alpha=8, **kwargs))
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, **kwargs))
    options = dict(lr=3e-4, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.01, loraplus_lr_embedding=2e-6,
                   betas=(0.8, 0.9))
    ours_opt = create_loraplus_optimizer(ours, torch.optim.AdamW, **options)
    theirs_opt = peft_loraplus(theirs, torch.optim.AdamW, **options)

    assert _groups(ours, ours_opt) == _groups(theirs, theirs_opt)
    for ours_group, theirs_group in zip(ours_opt.param_groups, theirs_opt.param_groups, strict=True):
        assert ours_group["betas"] == theirs_group["betas"] == (0.8, 0.9)
    lrs = [g["lr"] for g in ours_opt.param_groups]
    assert lrs == [3e-4, 2e-6, 3e-4 * 16.0, 3e-4 * 16.0]
    # Every lora_B factor is in a B group; no lora_A factor is.
    b_names = {n for g in _groups(ours, ours_opt)[2:] for n in g[2]}
    assert {n for n, _ in ours.named_parameters() if "lora_B." in n} <= b_names
    assert not any("lora_A." in n for n in b_names)


def test_dora_magnitudes_go_with_b() -> None:
    """1-D trainable parameters (DoRA's lora_magnitude_vector is one) take lr × ratio, as in PEFT."""
    model = get_peft_model(make_llama(), LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    optimizer = create_loraplus_optimizer(model, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4.0)
    groups = _groups(model, optimizer)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.default" in groups[2][2]
    assert groups[2][0] == pytest.approx(0.4)


def test_b_learns_ratio_times_faster() -> None:
    """One SGD step: the B update is exactly ratio × what a plain optimizer at lr would do."""
    model = get_peft_model(make_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    ids = torch.randint(0, 64, (2, 6))
    model(input_ids=ids).logits.square().mean().backward()
    expected_b, expected_a = b - 0.01 * 8 * b.grad, a - 0.01 * a.grad
    create_loraplus_optimizer(model, torch.optim.SGD, lr=0.01, loraplus_lr_ratio=8).step()
    torch.testing.assert_close(b, expected_b, atol=1e-7, rtol=0)
    torch.testing.assert_close(a, expected_a, atol=1e-7, rtol=0)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_ratio_must_be_positive(bad: float) -> None:
    model = get_peft_model(make_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=bad)
