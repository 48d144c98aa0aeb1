"""Interop with PEFT 0.21 (a test dependency, never imported by lorakit): files go both ways, logits agree."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ToyNet, make_gpt2, make_llama
from safetensors import safe_open
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model

peft = pytest.importorskip("peft")

ATOL = 1e-5


def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def _train_like(model: nn.Module, std: float = 0.1) -> None:
    """Move every trainable tensor away from its init (B ≠ 0, saved modules and trained biases changed)."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * std)


def _gpt2_ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 10))


def _toy_ids() -> torch.Tensor:
    return torch.randint(0, 20, (3, 8))


Case = tuple[Callable[[], nn.Module], dict[str, Any], Callable[[], torch.Tensor]]


def _gpt2_classifier() -> nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, num_labels=3, pad_token_id=0)
    return GPT2ForSequenceClassification(config).eval()


def _cls_ids() -> torch.Tensor:
    return torch.randint(1, 64, (2, 10))


# Configs valid in both libraries (same keyword names), each paired with a base model and inputs.
CASES: dict[str, Case] = {
    "c_attn": (make_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn"]), _gpt2_ids),
    "all_linear": (make_llama, dict(r=4, lora_alpha=8, target_modules="all-linear"), _gpt2_ids),
    "rank_pattern": (make_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                     rank_pattern={"c_proj": 2}, alpha_pattern={"c_fc": 32}, use_rslora=True),
                     _gpt2_ids),
    "bias_lora_only": (make_gpt2, dict(r=4, target_modules=["c_attn", "c_fc"], bias="lora_only"), _gpt2_ids),
    "modules_to_save": (make_gpt2, dict(r=4, target_modules=["c_attn"], modules_to_save=["ln_f"]), _gpt2_ids),
    "embedding_gpt2": (make_gpt2, dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"]), _gpt2_ids),
    # PEFT also writes the targeted embed_tokens' full base weight (its save_embedding_layers).
    "embedding_llama": (make_llama, dict(r=4, target_modules=["embed_tokens", "q_proj", "v_proj"]), _gpt2_ids),
    "regex_target": (make_llama, dict(r=2, target_modules=r".*layers\.1\.mlp\.(up|down)_proj"), _gpt2_ids),
    "toy_convs": (lambda: ToyNet().eval(), dict(r=2, lora_alpha=4, target_modules=["emb", "conv1d", "conv2d", "mlp"],
                                                modules_to_save=["head"]), _toy_ids),
    "seq_cls": (_gpt2_classifier, dict(r=4, target_modules=["c_attn"], task_type="SEQ_CLS"), _cls_ids),
}


def _no_peft_key_warnings(record: list[warnings.WarningMessage]) -> None:
    bad = [str(w.message) for w in record if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not bad, bad


@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_adapter_loads_in_peft(case: str, tmp_path: Path) -> None:
    factory, kwargs, make_inputs = CASES[case]
    model = factory()
    fresh = copy.deepcopy(model)
    inputs = make_inputs()
    ours = get_peft_model(model, LoraConfig(**kwargs))
    _train_like(ours)
    expected = _logits(ours, inputs)
    assert (expected - _logits(fresh, inputs)).abs().max() > 1e-3  # the adapter changes the output
    ours.save_pretrained(tmp_path)

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    _no_peft_key_warnings(record)
    torch.testing.assert_close(_logits(theirs, inputs), expected, atol=ATOL, rtol=0)


# SEQ_CLS: both libraries train and save the classification head ("score" here) without being told.
FROM_PEFT_CASES: dict[str, Case] = CASES


@pytest.mark.parametrize("case", sorted(FROM_PEFT_CASES))
def test_peft_adapter_loads_in_lorakit(case: str, tmp_path: Path) -> None:
    factory, kwargs, make_inputs = FROM_PEFT_CASES[case]
    model = factory()
    fresh = copy.deepcopy(model)
    inputs = make_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes (fan_in_fan_out for Conv1D, …) are not ours to judge
        theirs = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **kwargs))
        _train_like(theirs)
        theirs.save_pretrained(str(tmp_path))
    expected = _logits(theirs, inputs)
    assert (expected - _logits(fresh, inputs)).abs().max() > 1e-3

    ours = PeftModel.from_pretrained(fresh, tmp_path)  # any LorakitWarning would fail the test
    torch.testing.assert_close(_logits(ours, inputs), expected, atol=ATOL, rtol=0)


def test_peft_named_adapters_load_from_their_subdirectories(tmp_path: Path) -> None:
    model = make_gpt2()
    fresh = copy.deepcopy(model)
    inputs = _gpt2_ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
        theirs.add_adapter("other", peft.LoraConfig(r=2, target_modules=["c_proj"], init_lora_weights=False))
        theirs.save_pretrained(str(tmp_path))
    ours = PeftModel.from_pretrained(fresh, tmp_path)
    ours.load_adapter(tmp_path / "other", "other")
    for name in ("default", "other"):
        theirs.set_adapter(name)
        ours.set_adapter(name)
        torch.testing.assert_close(_logits(ours, inputs), _logits(theirs, inputs), atol=ATOL, rtol=0)


def _file_summary(directory: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as handle:
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        assert handle.metadata()["format"] == "pt"
    text = (directory / "adapter_config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True)
    return shapes, config


@pytest.mark.parametrize("case", ["modules_to_save", "bias_lora_only", "embedding_gpt2", "toy_convs", "rank_pattern"])
def test_same_files_as_peft(case: str, tmp_path: Path) -> None:
    """Same tensor keys and shapes, same config keys and values (PEFT stores target lists as sets)."""
    factory, kwargs, _ = CASES[case]
    model = factory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs))
        theirs.save_pretrained(str(tmp_path / "peft"))
    get_peft_model(model, LoraConfig(**kwargs)).save_pretrained(tmp_path / "lorakit")
    peft_shapes, peft_config = _file_summary(tmp_path / "peft")
    our_shapes, our_config = _file_summary(tmp_path / "lorakit")
    assert our_shapes == peft_shapes
    assert set(our_config) == set(peft_config)
    for key in ("target_modules", "modules_to_save"):
        for config in (our_config, peft_config):
            if isinstance(config[key], list):
                config[key] = sorted(config[key])
    assert our_config.pop("peft_version").startswith(peft_config.pop("peft_version"))
    assert our_config == peft_config
