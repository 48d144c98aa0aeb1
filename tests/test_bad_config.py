"""Bad input to the core: one clear ValueError/TypeError naming the value and the fix; model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], types: list[type]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [type(m) for m in model.modules()] == types
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, r"r=0 .*positive integer"),
        ({"r": -3}, r"r=-3"),
        ({"r": 2.5}, r"r=2.5"),
        ({"lora_dropout": -0.1}, r"lora_dropout=-0.1 .*\[0, 1\)"),
        ({"lora_dropout": 1.0}, r"lora_dropout=1.0"),
        ({"bias": "some"}, r"bias='some' .*'none', 'all', 'lora_only'"),
        ({"init_lora_weights": "xavier"}, r"init_lora_weights='xavier'"),
        ({"lora_alpha": float("nan")}, r"lora_alpha=nan"),
        ({"target_modules": 3}, r"target_modules=3"),
        ({"rank_pattern": {"c_attn": 0}}, r"rank_pattern\['c_attn'\]=0"),
        ({"task_type": "CAUSAL"}, r"task_type='CAUSAL' .*CAUSAL_LM"),
        ({"layers_to_transform": [-1]}, r"layers_to_transform=\[-1\]"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraConfig(**{"target_modules": ["c_attn"], **kwargs})


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (dict(target_modules=["c_atn"]), r"\['c_atn'\] matched no module; modules that could be adapted: .*c_attn"),
        (dict(target_modules=r".*nothing.*"), r"matched no module"),
        (dict(target_modules=["ln_1"]), r"type lorakit cannot adapt: .*ln_1 \(LayerNorm\)"),
        (dict(target_modules=["c_attn"], rank_pattern={"q_proj": 2}), r"rank_pattern key 'q_proj' matches no"),
        (dict(target_modules=["c_attn"], alpha_pattern={"zz": 2}), r"alpha_pattern key 'zz' matches no"),
        (dict(target_modules=["c_attn"], layers_to_transform=[7]), r"matched no module .*layers_to_transform=\[7\]"),
        (dict(target_modules=["c_attn"], modules_to_save=["scorer"]), r"modules_to_save entry 'scorer' matches no"),
        (dict(target_modules=["wte"], init_lora_weights="pissa"), r"pissa.*Linear/Conv1D"),
    ],
)
def test_injection_errors_leave_model_untouched(gpt2: nn.Module, config: dict, message: str) -> None:
    before, types = _snapshot(gpt2), [type(m) for m in gpt2.modules()]
    with pytest.raises(ValueError, match=message):
        get_peft_model(gpt2, LoraConfig(**config))
    _assert_unchanged(gpt2, before, types)


def test_config_must_be_lorakit_config(gpt2: nn.Module) -> None:
    with pytest.raises(TypeError, match="lorakit LoraConfig"):
        get_peft_model(gpt2, {"r": 8})  # type: ignore[arg-type]


def test_adapter_name_errors(gpt2: nn.Module, ids: torch.Tensor) -> None:
    peft = get_peft_model(gpt2, LoraConfig(target_modules=["c_attn"], init_lora_weights=False))
    before = _snapshot(peft)
    types = [type(m) for m in peft.modules()]
    with pytest.raises(ValueError, match="'default' already exists"):
        peft.add_adapter("default", LoraConfig(target_modules=["c_proj"]))
    with pytest.raises(ValueError, match="no adapter named 'nope'; this model has \\['default'\\]"):
        peft.set_adapter("nope")
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        peft.delete_adapter("nope")
    with pytest.raises(ValueError, match="adapter name '../x' is invalid"):
        peft.add_adapter("../x", LoraConfig(target_modules=["c_proj"]))
    with pytest.raises(ValueError, match="matched no module"):
        peft.add_adapter("second", LoraConfig(target_modules=["nothing"]))
    assert list(peft.peft_config) == ["default"]
    after = peft.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [type(m) for m in peft.modules()] == types


def test_mixed_batch_errors(gpt2: nn.Module, ids: torch.Tensor) -> None:
    peft = get_peft_model(gpt2, LoraConfig(target_modules=["c_attn"], init_lora_weights=False))
    with pytest.raises(ValueError, match="adapter_names has 2 entries but the batch has 3 rows"):
        peft(ids, adapter_names=["default", "default"])
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['x'\]"):
        peft(ids, adapter_names=["default", "x", "default"])
    with pytest.raises(TypeError, match="one adapter name per row"):
        peft(ids, adapter_names="default")
    peft.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base weights; call unmerge_adapter"):
        peft(ids, adapter_names=["default"] * 3)
    assert all(layer.batch_plan is None for layer in peft.modules() if hasattr(layer, "batch_plan"))


def test_delete_merged_adapter_refused(gpt2: nn.Module) -> None:
    peft = get_peft_model(gpt2, LoraConfig(target_modules=["c_attn"], init_lora_weights=False))
    peft.add_adapter("b", LoraConfig(target_modules=["c_attn"], init_lora_weights=False))
    peft.merge_adapter(["b"])
    with pytest.raises(ValueError, match="'b' is merged into the base weights"):
        peft.delete_adapter("b")


def test_wrapping_twice_refused(gpt2: nn.Module) -> None:
    peft = get_peft_model(gpt2, LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="already holds LoRA adapters; call add_adapter"):
        get_peft_model(peft.get_base_model(), LoraConfig(target_modules=["c_attn"]))
