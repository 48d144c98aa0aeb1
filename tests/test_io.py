"""Adapter files: bit-exact round trips, PEFT's layout, the base fingerprint, and clear errors on bad files."""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ToyNet, make_gpt2, make_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit import (
    LoraConfig,
    LorakitWarning,
    PeftModel,
    get_peft_model,
    load_adapter_weights,
    save_adapter_weights,
)
from lorakit.io import file_key, get_adapter_state_dict
from lorakit.layers import LoraLayer

# ------------------------------------------------------------------------------------------------ helpers


def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def _train_like(model: nn.Module, std: float = 0.1) -> None:
    """Move every trainable tensor (LoRA factors, modules_to_save copies, trained biases) away from its
    init, as training would: B ≠ 0, copies ≠ originals, biases ≠ the base's."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * std)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, f"tensors differ: {differ[:5]}"


CASES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any], Callable[[], torch.Tensor]]] = {
    # GPT-2: Conv1D (stored in×out) and Embedding targets, a saved module, trained biases of adapted layers.
    "gpt2": (make_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "wte"], modules_to_save=["ln_f"],
                             bias="lora_only"), lambda: torch.randint(0, 64, (2, 10))),
    # Llama: Linear + Embedding, per-module ranks/alphas, rsLoRA.
    "llama": (make_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "embed_tokens"],
                               rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16}, use_rslora=True),
              lambda: torch.randint(0, 64, (2, 10))),
    # Toy net: Embedding, Conv1d, Conv2d, Linear targets, a saved head, every bias trained.
    "toy": (lambda: ToyNet().eval(), dict(r=2, lora_alpha=4, target_modules=["emb", "conv1d", "conv2d", "mlp"],
                                          modules_to_save=["head"], bias="all"),
            lambda: torch.randint(0, 20, (3, 8))),
}


def _trained(case: str) -> tuple[PeftModel, nn.Module, torch.Tensor]:
    """(adapted model with a 'trained' adapter, an untouched copy of its base, inputs)."""
    factory, kwargs, make_inputs = CASES[case]
    model = factory()
    fresh = copy.deepcopy(model)
    peft = get_peft_model(model, LoraConfig(**kwargs))
    _train_like(peft)
    return peft, fresh, make_inputs()


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_bit_exact(case: str, tmp_path: Path) -> None:
    peft, fresh, inputs = _trained(case)
    base_logits = _logits(fresh, inputs)
    expected = _logits(peft, inputs)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter really changes the output

    peft.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)

    assert torch.equal(_logits(loaded, inputs), expected)
    _assert_same_state(_state(loaded), _state(peft))  # every tensor, base and adapter, bit for bit
    assert loaded.peft_config["default"].r == peft.peft_config["default"].r
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False: inference mode


def test_is_trainable_unfreezes_exactly_the_adapter(tmp_path: Path) -> None:
    peft, fresh, _ = _trained("gpt2")
    peft.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh, tmp_path, is_trainable=True)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in peft.named_parameters() if p.requires_grad}
    assert loaded.peft_config["default"].inference_mode is False


def test_several_named_adapters_in_one_directory(tmp_path: Path) -> None:
    model = make_gpt2()
    fresh = copy.deepcopy(model)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"]))
    peft.add_adapter("second", LoraConfig(r=2, lora_alpha=4, target_modules=["c_proj"], modules_to_save=["ln_f"]))
    peft.add_adapter("third", LoraConfig(r=3, target_modules=["wte", "c_fc"]))
    for name in ("default", "second", "third"):
        peft.set_adapter(name)
        _train_like(peft)
    peft.save_pretrained(tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors", "second", "third"]
    for sub in ("second", "third"):
        assert sorted(p.name for p in (tmp_path / sub).iterdir()) == ["adapter_config.json",
                                                                      "adapter_model.safetensors"]

    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    loaded.load_adapter(tmp_path / "second", "second")
    loaded.load_adapter(tmp_path / "third", "third")
    inputs = torch.randint(0, 64, (2, 9))
    outputs = []
    for name in ("default", "second", "third"):
        peft.set_adapter(name)
        loaded.set_adapter(name)
        outputs.append(_logits(peft, inputs))
        assert torch.equal(_logits(loaded, inputs), outputs[-1]), name
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])
    _assert_same_state(_state(loaded), _state(peft))


def test_selected_adapters_saves_only_those(tmp_path: Path) -> None:
    peft = get_peft_model(make_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    peft.add_adapter("other", LoraConfig(r=2, target_modules=["c_proj"]))
    peft.save_pretrained(tmp_path, selected_adapters=["other"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "other"]  # the card sits at the root
    with pytest.raises(ValueError, match=r"selected_adapters \['nope'\].*'default', 'other'"):
        peft.save_pretrained(tmp_path / "x", selected_adapters=["nope"])
    assert not (tmp_path / "x").exists()


def test_saving_while_merged_writes_the_same_adapter(tmp_path: Path) -> None:
    peft, fresh, inputs = _trained("llama")
    peft.save_pretrained(tmp_path / "unmerged")
    unmerged_logits = _logits(peft, inputs)
    peft.merge_adapter()
    peft.save_pretrained(tmp_path / "merged")
    # Same tensors, same metadata (fingerprint of W0, not of W0 + ΔW), same config. (Not the same bytes:
    # safetensors writes its metadata map in no fixed order.)
    _assert_same_state(load_adapter_weights(tmp_path / "merged"), load_adapter_weights(tmp_path / "unmerged"))
    assert load_metadata(tmp_path / "merged") == load_metadata(tmp_path / "unmerged")
    config = "adapter_config.json"
    assert (tmp_path / "merged" / config).read_bytes() == (tmp_path / "unmerged" / config).read_bytes()
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "merged")
    assert torch.equal(_logits(loaded, inputs), unmerged_logits)


def test_load_adapter_into_a_model_with_merged_adapters(tmp_path: Path) -> None:
    peft, fresh, inputs = _trained("gpt2")
    peft.save_pretrained(tmp_path)
    host = get_peft_model(fresh, LoraConfig(r=2, target_modules=["c_attn"]))
    _train_like(host)
    host.merge_adapter()  # c_attn's base weight now holds W0 + ΔW; the fingerprint must see W0
    host.load_adapter(tmp_path, "loaded")
    host.unmerge_adapter()
    host.set_adapter("loaded")
    assert torch.equal(_logits(host, inputs), _logits(peft, inputs))


# ------------------------------------------------------------------------------------------------ format


def test_file_key_removes_the_adapter_name_only() -> None:
    pairs = {
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.sv2.weight":
            "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight",
        "base_model.model.transformer.wte.lora_embedding_B.sv2": "base_model.model.transformer.wte.lora_embedding_B",
        "base_model.model.transformer.ln_f.modules_to_save.sv2.bias": "base_model.model.transformer.ln_f.bias",
        "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias":
            "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias",
        "base_model.model.sv2.lora_A.sv2.weight": "base_model.model.sv2.lora_A.weight",  # a module named like it
    }
    for model_key, disk_key in pairs.items():
        assert file_key(model_key, "sv2") == disk_key


def test_gpt2_layout_and_config_match_peft_format(tmp_path: Path) -> None:
    peft, _, _ = _trained("gpt2")
    peft.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        metadata = handle.metadata()
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    prefix = "base_model.model.transformer."
    expected = {prefix + "wte.lora_embedding_A": (4, 64), prefix + "wte.lora_embedding_B": (32, 4),
                prefix + "ln_f.weight": (32,), prefix + "ln_f.bias": (32,)}
    for layer in (0, 1):
        stem = f"{prefix}h.{layer}.attn.c_attn."
        expected |= {stem + "lora_A.weight": (4, 32), stem + "lora_B.weight": (96, 4), stem + "base_layer.bias": (96,)}
    assert shapes == expected  # A/B in (out, in) orientation even for Conv1D, as PEFT stores them
    assert metadata["format"] == "pt"
    assert metadata["lorakit.format_version"] == "1"
    assert metadata["lorakit.base_fingerprint"].startswith("lkfp1-")

    text = (tmp_path / "adapter_config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True)
    assert config["inference_mode"] is True
    assert config["fan_in_fan_out"] is True  # GPT-2 Conv1D targets, config said None
    assert config["peft_type"] == "LORA" and config["peft_version"].startswith("0.21.2")
    assert config["auto_mapping"] == {"base_model_class": "GPT2LMHeadModel",
                                      "parent_library": "transformers.models.gpt2.modeling_gpt2"}
    assert {"r", "lora_alpha", "target_modules", "modules_to_save", "bias", "rank_pattern", "alpha_pattern",
            "use_rslora", "use_dora", "init_lora_weights", "layers_to_transform", "layers_pattern", "task_type",
            "base_model_name_or_path", "exclude_modules", "lora_dropout", "megatron_core"} <= set(config)
    assert peft.peft_config["default"].fan_in_fan_out is None  # the user's config is not rewritten


def test_raw_weights_pair_round_trip(tmp_path: Path) -> None:
    peft, _, _ = _trained("toy")
    tensors = get_adapter_state_dict(peft)
    written = save_adapter_weights(tensors, tmp_path, metadata={"note": "hello"})
    assert written == tmp_path / "adapter_model.safetensors"
    back = load_adapter_weights(tmp_path)
    _assert_same_state(back, tensors)
    with safe_open(str(written), "pt") as handle:
        assert handle.metadata()["note"] == "hello" and handle.metadata()["format"] == "pt"
    with pytest.raises(TypeError, match="str keys"):
        save_adapter_weights({"a": [1.0]}, tmp_path / "x.safetensors")  # type: ignore[dict-item]


def test_legacy_bin_is_read_weights_only(tmp_path: Path) -> None:
    peft, fresh, inputs = _trained("gpt2")
    peft.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    with pytest.warns(LorakitWarning, match=r"no adapter_model\.safetensors; reading the legacy adapter_model\.bin"):
        fallback = PeftModel.from_pretrained(copy.deepcopy(fresh), tmp_path)  # PEFT's fallback, with a warning
    assert torch.equal(_logits(fallback, inputs), _logits(peft, inputs))
    loaded = PeftModel.from_pretrained(fresh, tmp_path, use_safetensors=False)
    assert torch.equal(_logits(loaded, inputs), _logits(peft, inputs))
    # Saving as safetensors again removes the stale .bin, so the two formats never disagree.
    peft.save_pretrained(tmp_path)
    assert not (tmp_path / "adapter_model.bin").exists()


class _Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch pwned",))


def test_malicious_bin_is_not_executed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    adapter = tmp_path / "adapter"
    peft, fresh, _ = _trained("gpt2")
    peft.save_pretrained(adapter, safe_serialization=False)
    with open(adapter / "adapter_model.bin", "wb") as handle:
        pickle.dump({"x": _Exploit()}, handle, protocol=2)
    before = _state(fresh)
    with pytest.raises(ValueError, match=r"adapter_model\.bin could not be read as a weights-only"):
        PeftModel.from_pretrained(fresh, adapter, use_safetensors=False)
    assert not (tmp_path / "pwned").exists()
    _assert_same_state(_state(fresh), before)


def test_unknown_config_keys_warn_once_and_load(tmp_path: Path) -> None:
    peft, fresh, inputs = _trained("gpt2")
    peft.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text()) | {"future_option": 3, "another_new_key": None}
    path.write_text(json.dumps(config))
    with pytest.warns(LorakitWarning, match="another_new_key, future_option") as record:
        loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert len(record) == 1
    assert torch.equal(_logits(loaded, inputs), _logits(peft, inputs))


def test_hand_edits_of_the_config_are_honoured(tmp_path: Path) -> None:
    peft, fresh, inputs = _trained("gpt2")
    peft.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"base_model_name_or_path": "my/base", "lora_alpha": 16}))
    loaded = PeftModel.from_pretrained(fresh, tmp_path)  # no warning: an edit is not an interrupted save
    assert loaded.peft_config["default"].base_model_name_or_path == "my/base"
    assert loaded.peft_config["default"].lora_alpha == 16
    assert not torch.equal(_logits(loaded, inputs), _logits(peft, inputs))  # alpha doubled the update


def test_interrupted_save_state_loads_the_new_adapter(tmp_path: Path) -> None:
    """The state a save killed between its two renames leaves: new weights, the config they replaced."""
    model = make_gpt2()
    fresh = copy.deepcopy(model)
    old = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["c_attn"]))
    new = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules=["c_attn", "c_proj"]))
    _train_like(old)
    _train_like(new)
    old.save_pretrained(tmp_path / "torn")
    shutil.copytree(tmp_path / "torn", tmp_path / "complete")
    new.save_pretrained(tmp_path / "complete")  # its weights record that they replace old's config
    shutil.copy(tmp_path / "complete" / "adapter_model.safetensors", tmp_path / "torn" / "adapter_model.safetensors")
    with pytest.warns(LorakitWarning, match="interrupted between writing the weights and the config"):
        loaded = PeftModel.from_pretrained(fresh, tmp_path / "torn")
    inputs = torch.randint(0, 64, (2, 7))
    assert torch.equal(_logits(loaded, inputs), _logits(new, inputs))


@pytest.mark.parametrize("variant", ["pre_base_layer_bias", "no_model_prefix"])
def test_older_peft_key_variants_load(variant: str, tmp_path: Path) -> None:
    """PEFT < 0.7 stored lora_only biases as `<module>.bias`; integrations write keys without the prefix."""
    peft, fresh, inputs = _trained("gpt2")
    peft.save_pretrained(tmp_path)

    def rename(tensors: dict[str, torch.Tensor]) -> None:
        for key in list(tensors):
            if variant == "pre_base_layer_bias":
                new_key = key.replace(".base_layer.bias", ".bias")
            else:
                new_key = key.removeprefix("base_model.model.")
            tensors[new_key] = tensors.pop(key)

    _rewrite_weights(tmp_path, rename)
    loaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(_logits(loaded, inputs), _logits(peft, inputs))


# ------------------------------------------------------------------------------------------------ fingerprint


def test_wrong_base_is_refused_unless_allowed(tmp_path: Path) -> None:
    peft, _, inputs = _trained("gpt2")
    peft.save_pretrained(tmp_path)
    torch.manual_seed(1)
    other = make_gpt2()  # same architecture, other weights
    stored = load_metadata(tmp_path)["lorakit.base_fingerprint"]
    before = _state(other)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(other, tmp_path)
    message = str(info.value)
    assert "adapter_model.safetensors was saved for a different base model" in message
    assert stored in message and "allow_base_mismatch=True" in message
    assert "different weight values" in message
    found = re.findall(r"lkfp1-[0-9a-f]{16}-[0-9a-f]{16}", message)
    assert len(set(found)) == 2  # both fingerprints named
    _assert_same_state(_state(other), before)
    assert not any(isinstance(m, LoraLayer) for m in other.modules())

    loaded = PeftModel.from_pretrained(other, tmp_path, allow_base_mismatch=True)
    assert loaded.peft_config["default"].r == 4


def test_other_architecture_is_refused_as_such(tmp_path: Path) -> None:
    peft, _, _ = _trained("gpt2")
    peft.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="names or weight shapes differ"):
        PeftModel.from_pretrained(make_gpt2(n_layer=1), tmp_path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_same_base_in_another_dtype_matches(dtype: torch.dtype, tmp_path: Path) -> None:
    peft, fresh, inputs = _trained("llama")
    peft.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(fresh.to(dtype), tmp_path)
    torch.testing.assert_close(_logits(loaded, inputs).float(), _logits(peft, inputs), atol=0.1, rtol=0.1)


def test_pissa_adapter_needs_its_residual_base(tmp_path: Path) -> None:
    """PiSSA rewrites W0 into a residual; the fingerprint is of that residual, the base the adapter needs."""
    model = make_llama()
    original = copy.deepcopy(model)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    _train_like(peft, std=0.01)
    inputs = torch.randint(0, 64, (2, 8))
    expected = _logits(peft, inputs)
    peft.save_pretrained(tmp_path)
    residual = copy.deepcopy(peft).unload()
    with pytest.raises(ValueError, match="different base model"):
        PeftModel.from_pretrained(original, tmp_path)
    loaded = PeftModel.from_pretrained(residual, tmp_path)  # loading does not run PiSSA again
    assert torch.equal(_logits(loaded, inputs), expected)
    assert loaded.peft_config["default"].init_lora_weights == "pissa"


def load_metadata(directory: Path) -> dict[str, str]:
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as handle:
        return dict(handle.metadata())


# ------------------------------------------------------------------------------------------------ bad files


def _rewrite_weights(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite the weights as another tool would: edited tensors, plain {"format": "pt"} metadata."""
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


C_ATTN = "base_model.model.transformer.h.{}.attn.c_attn.{}"


def _drop_and_add(tensors: dict[str, torch.Tensor]) -> None:
    del tensors[C_ATTN.format(0, "lora_A.weight")]
    del tensors["base_model.model.transformer.ln_f.weight"]
    tensors["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"] = torch.zeros(4, 32)


def _wrong_shape(tensors: dict[str, torch.Tensor]) -> None:
    tensors[C_ATTN.format(1, "lora_B.weight")] = torch.zeros(96, 8)


def _truncate(directory: Path) -> None:
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _flip_a_data_byte(directory: Path) -> None:
    path = directory / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _link_weights_outside(directory: Path) -> None:
    outside = directory.parent / "elsewhere.safetensors"
    shutil.move(directory / "adapter_model.safetensors", outside)
    (directory / "adapter_model.safetensors").symlink_to(outside)


def _set_config(**entries: Any) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / "adapter_config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | entries))
    return edit


BAD_FILES: dict[str, tuple[Callable[[Path], Any], type[Exception], list[str]]] = {
    "missing_dir": (lambda d: shutil.rmtree(d), FileNotFoundError, [r"adapter directory .*adapter does not exist"]),
    "missing_config": (lambda d: (d / "adapter_config.json").unlink(), FileNotFoundError,
                       [r"adapter_config\.json not found"]),
    "missing_weights": (lambda d: (d / "adapter_model.safetensors").unlink(), FileNotFoundError,
                        [r"adapter_model\.safetensors not found"]),
    "malformed_json": (lambda d: (d / "adapter_config.json").write_text('{"r": 4,'), ValueError,
                       [r"adapter_config\.json is not valid JSON"]),
    "json_not_object": (lambda d: (d / "adapter_config.json").write_text("[1, 2]"), ValueError,
                        [r"adapter_config\.json must hold a JSON object"]),
    "no_target_modules": (_set_config(target_modules=None), ValueError,
                          [r"adapter_config\.json: adapter config has no 'target_modules'"]),
    "unsupported_math": (_set_config(lora_bias=True), ValueError, [r"adapter_config\.json: .*lora_bias=True"]),
    "targets_absent": (_set_config(target_modules=["q_proj"]), ValueError,
                       [r"adapter_config\.json does not fit this model: .*matched no module"]),
    "missing_and_unexpected": (lambda d: _rewrite_weights(d, _drop_and_add), ValueError, [
        r"adapter_model\.safetensors does not match",
        r"missing keys \(2\): base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_A\.weight, "
        r"base_model\.model\.transformer\.ln_f\.weight",
        r"unexpected keys \(1\): base_model\.model\.transformer\.h\.0\.mlp\.c_fc\.lora_A\.weight"]),
    "shape_mismatch": (lambda d: _rewrite_weights(d, _wrong_shape), ValueError, [
        r"shape mismatches \(1\): base_model\.model\.transformer\.h\.1\.attn\.c_attn\.lora_B\.weight: "
        r"\(96, 8\) in the file, \(96, 4\) in the model"]),
    "truncated": (_truncate, ValueError, [r"adapter_model\.safetensors is not a readable safetensors file",
                                          "truncated or corrupt"]),
    "corrupt_data": (_flip_a_data_byte, ValueError, [r"adapter_model\.safetensors is corrupt"]),
    "weights_link_outside": (_link_weights_outside, ValueError, [r"adapter_model\.safetensors is a symbolic link"]),
}


@pytest.fixture
def saved_adapter(tmp_path: Path) -> tuple[Path, nn.Module]:
    model = make_gpt2()
    fresh = copy.deepcopy(model)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["ln_f"]))
    _train_like(peft)
    peft.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", fresh


def _snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], list[bool]]:
    return _state(model), [type(m).__name__ for m in model.modules()], [p.requires_grad for p in model.parameters()]


def _assert_unchanged(model: nn.Module, snapshot: tuple[dict[str, torch.Tensor], list[str], list[bool]]) -> None:
    state, kinds, grads = _snapshot(model)
    _assert_same_state(state, snapshot[0])
    assert kinds == snapshot[1] and grads == snapshot[2]


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_give_one_clear_error_and_change_nothing(case: str, saved_adapter: tuple[Path, nn.Module]) -> None:
    directory, fresh = saved_adapter
    damage, error, patterns = BAD_FILES[case]
    damage(directory)

    before = _snapshot(fresh)
    with pytest.raises(error) as info:
        PeftModel.from_pretrained(fresh, directory)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))
    _assert_unchanged(fresh, before)

    # The same file, loaded next to an existing adapter: that model is left as it was, too.
    host = get_peft_model(fresh, LoraConfig(r=2, target_modules=["c_proj", "c_attn"], modules_to_save=["ln_f"]))
    host_before = _snapshot(host)
    with pytest.raises(error) as info:
        host.load_adapter(directory, "second")
    assert re.search(patterns[0], str(info.value))
    _assert_unchanged(host, host_before)
    assert list(host.peft_config) == ["default"]


def test_wrong_base_changes_nothing_in_a_host_model(saved_adapter: tuple[Path, nn.Module]) -> None:
    directory, _ = saved_adapter
    torch.manual_seed(3)
    host = get_peft_model(make_gpt2(), LoraConfig(r=2, target_modules=["c_proj"]))
    before = _snapshot(host)
    with pytest.raises(ValueError, match="different base model"):
        host.load_adapter(directory, "second")
    _assert_unchanged(host, before)


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "", "x.y"])
def test_path_escaping_adapter_names_are_refused(name: str, saved_adapter: tuple[Path, nn.Module]) -> None:
    directory, fresh = saved_adapter
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match="adapter name .* is invalid"):
        PeftModel.from_pretrained(fresh, directory, adapter_name=name)
    _assert_unchanged(fresh, before)


def test_save_refuses_to_write_through_a_symlinked_adapter_directory(tmp_path: Path) -> None:
    peft = get_peft_model(make_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    peft.add_adapter("other", LoraConfig(r=2, target_modules=["c_proj"]))
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "other").symlink_to(outside)
    with pytest.raises(ValueError, match=r"out/other is a symbolic link"):
        peft.save_pretrained(tmp_path / "out")
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["other"]  # nothing written at all


def test_load_adapter_refuses_an_existing_name(saved_adapter: tuple[Path, nn.Module]) -> None:
    directory, fresh = saved_adapter
    loaded = PeftModel.from_pretrained(fresh, directory)
    with pytest.raises(ValueError, match="an adapter named 'default' already exists"):
        loaded.load_adapter(directory, "default")
    with pytest.raises(ValueError, match="already holds LoRA adapters"):
        PeftModel.from_pretrained(loaded.get_base_model(), directory)
