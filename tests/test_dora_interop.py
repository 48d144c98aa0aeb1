"""DoRA files both ways with PEFT 0.21 (``use_dora=True``): equal logits, PEFT's keys and config on disk."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_gpt2, make_llama, save_tiny_model_dir
from safetensors import safe_open
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model

peft = pytest.importorskip("peft")

ATOL = 1e-5

# Configs valid in both libraries (same keyword names), each with use_dora=True added.
CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "gpt2_c_attn": (make_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn"])),
    "gpt2_patterns": (make_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                      rank_pattern={"c_proj": 2}, alpha_pattern={"c_fc": 32})),
    "gpt2_rslora_bias": (make_gpt2, dict(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"], use_rslora=True,
                                         bias="lora_only")),
    "llama_all_linear": (make_llama, dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "llama_patterns": (make_llama, dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                        rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 4})),
}


def _train_like(model: nn.Module, std: float = 0.1) -> None:
    """Move every trainable tensor (A, B, m, trained biases) away from its init, m by a relative factor."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if "lora_magnitude_vector" in name:
                param.mul_(torch.empty_like(param).uniform_(0.6, 1.4))
            else:
                param.add_(torch.randn_like(param) * std)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_dora_adapter_loads_in_lorakit(case: str, tmp_path: Path) -> None:
    make, kwargs = CASES[case]
    base = make()
    ids = torch.randint(0, 64, (2, 10))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(use_dora=True, **kwargs))
    _train_like(theirs)
    theirs.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        magnitudes = [k for k in handle.keys() if "lora_magnitude_vector" in k]
    assert magnitudes and all(k.endswith(".lora_magnitude_vector") for k in magnitudes)

    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert ours.peft_config["default"].use_dora
    expected = _logits(theirs, ids)
    assert (expected - _logits(base, ids)).abs().max() > 0.01  # the adapter changes the output
    torch.testing.assert_close(_logits(ours, ids), expected, atol=ATOL, rtol=0)
    ours.merge_adapter()  # the merged DoRA weight gives the same logits
    torch.testing.assert_close(_logits(ours, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_dora_adapter_loads_in_peft(case: str, tmp_path: Path) -> None:
    make, kwargs = CASES[case]
    base = make()
    ids = torch.randint(0, 64, (2, 10))
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(use_dora=True, **kwargs))
    _train_like(ours)
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    assert not any("lora_magnitude_vector." in k for k in keys)  # no adapter name, no ".weight"

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    expected = _logits(ours, ids)
    assert (expected - _logits(base, ids)).abs().max() > 0.01
    torch.testing.assert_close(_logits(theirs, ids), expected, atol=ATOL, rtol=0)
    # and back: the file PEFT re-saves loads in lorakit with the same logits
    resaved = tmp_path / "resaved"
    theirs.save_pretrained(resaved)
    again = PeftModel.from_pretrained(copy.deepcopy(base), resaved)
    torch.testing.assert_close(_logits(again, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("first_dora", [False, True])
def test_two_active_adapters_match_peft(tmp_path: Path, first_dora: bool) -> None:
    """Two adapters active together (plain + DoRA, DoRA + DoRA): PEFT's order semantics (a DoRA adapter rescales
    what came before); merging both in order gives the same logits and unmerging restores W0."""
    base = make_gpt2()
    ids = torch.randint(0, 64, (2, 10))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                                      use_dora=first_dora), adapter_name="plain")
    theirs.add_adapter("dora", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True))
    theirs.base_model.set_adapter(["plain", "dora"])
    _train_like(theirs)
    theirs.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "plain", adapter_name="plain")
    ours.load_adapter(tmp_path / "dora", "dora")
    ours.set_adapter(["plain", "dora"])
    expected = _logits(theirs, ids)
    torch.testing.assert_close(_logits(ours, ids), expected, atol=ATOL, rtol=0)
    weights = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer.weight" in n}
    ours.merge_adapter()
    torch.testing.assert_close(_logits(ours, ids), expected, atol=ATOL, rtol=0)
    ours.unmerge_adapter()
    assert all(torch.equal(p, weights[n]) for n, p in ours.named_parameters() if n in weights)


def test_dropout_training_step_matches_peft() -> None:
    """Train mode with dropout (PEFT re-runs the base product on the dropped input): same loss and grads."""
    base = make_llama()
    ids = torch.randint(0, 64, (2, 10))
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], lora_dropout=0.3, use_dora=True,
                  init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs))
    _train_like(theirs)
    ours.load_state_dict({k: v for k, v in _as_ours(theirs.state_dict()).items()}, strict=False)
    grads = []
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(7)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({n.replace(".weight", "").replace("lora_magnitude_vector.default", "lora_magnitude_vector"): p.grad
                      for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=ATOL, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_train_use_dora_writes_a_dora_adapter_peft_loads(tmp_path: Path) -> None:
    """`lorakit train --use-dora` on a tiny GPT-2 (Conv1D targets): loss falls, m trains, PEFT reads the file."""
    import json as json_module

    from lorakit.cli import main
    from lorakit.train.loop import load_causal_lm

    model_dir = save_tiny_model_dir(tmp_path / "model", "gpt2")
    data = tmp_path / "data.jsonl"
    words = ["cat", "dog", "sun", "bird", "sky", "lamp", "pen", "rose", "cup", "moon", "fig", "jam"] * 4
    data.write_text("".join(json_module.dumps({"prompt": f"is {w} short ->", "completion": "Y" if len(w) < 4 else "N"})
                            + "\n" for w in words))
    out = tmp_path / "run"
    code = main(["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--use-dora",
                 "--max-steps", "20", "--lr", "3e-2", "--target-modules", "all-linear", "--batch-size", "8",
                 "--log-every", "1", "--warmup-steps", "0", "--samples", "0", "--no-progress", "--r", "4"])
    assert code == 0
    rows = [json_module.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r and "split" not in r]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2
    assert json_module.loads((out / "adapter" / "adapter_config.json").read_text())["use_dora"] is True

    base, _ = load_causal_lm(model_dir)
    ids = torch.randint(0, 200, (2, 8))
    # eval(): the LoRA layers' dropout (p = 0.05 here) must be off in both (lorakit's new layers start in
    # training mode, as every fresh nn.Module).
    ours = PeftModel.from_pretrained(copy.deepcopy(base), out / "adapter").eval()
    layer = next(m for m in ours.modules() if hasattr(m, "lora_variant") and m.lora_variant)
    w0 = layer._weight_as_out_in(layer.base_layer.weight)
    assert (layer.lora_magnitude_vector["default"] - w0.norm(dim=1)).abs().max() > 1e-4  # m was trained
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out / "adapter")).eval()
    torch.testing.assert_close(_logits(ours, ids), _logits(theirs, ids), atol=ATOL, rtol=0)


def _as_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's in-memory keys → lorakit's (PEFT keeps m as ``lora_magnitude_vector.<name>.weight``)."""
    return {k.replace("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default"): v
            for k, v in state.items()}
