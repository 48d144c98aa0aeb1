"""PEFT drop-in parity (issue 17): PEFT's behaviours and options, checked side by side with PEFT 0.21.2.

Each test makes the same calls on PEFT and on lorakit where PEFT is the reference (same outputs, same
trainable sets, same saved keys), and asserts the model and files unchanged where lorakit refuses. The
deliberate differences (README "Differences from PEFT") have their own tests at the end.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ToyNet, make_gpt2, make_llama, randomize_lora
from torch import nn

import lorakit
from lorakit import LoraConfig, LorakitWarning, PeftModel, get_peft_model
from lorakit.layers import LoraLayer

peft = pytest.importorskip("peft")

ATOL = 1e-5


def _logits(model: nn.Module, inputs: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def _ids() -> torch.Tensor:
    return torch.randint(0, 64, (2, 10))


def _trainable(model: nn.Module) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _structure(model: nn.Module) -> list[tuple[str, str]]:
    return [(n, type(m).__name__) for n, m in model.named_modules()]


def _train_like(model: nn.Module, std: float = 0.1) -> None:
    """Move every trainable tensor off its init (B ≠ 0), so adapters change the output."""
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * std)


def _copy_adapter_weights(source: nn.Module, target: nn.Module) -> None:
    """Copy every LoRA/modules_to_save tensor and trained bias of ``source`` into ``target`` (PEFT and
    lorakit use the same keys)."""
    theirs = source.state_dict()
    trained = {n for n, p in source.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for key, value in target.state_dict(keep_vars=True).items():
            if "lora_" in key or "modules_to_save" in key or key in trained:
                value.copy_(theirs[key])


def _pair(make: Any, **config: Any) -> tuple[nn.Module, nn.Module]:
    """(PEFT model, lorakit model) on identical copies of one base, with identical non-zero adapters."""
    base = make()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    _train_like(theirs)
    _copy_adapter_weights(theirs, ours)
    return theirs, ours


# ---------------------------------------------------------------------------------------------- behaviours 1–9
def test_from_pretrained_for_inference_is_in_eval_mode(tmp_path: Path) -> None:
    """1. is_trainable=False: dropout is off, so two forwards agree (and agree with PEFT's)."""
    base = make_gpt2()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_dropout=0.5, target_modules=["c_attn"]))
    _train_like(model)
    model.save_pretrained(tmp_path)
    inputs = _ids()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base).train(), tmp_path)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert torch.equal(_logits(loaded, inputs), _logits(loaded, inputs))
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base).train(), tmp_path)
    assert not theirs.training
    torch.testing.assert_close(_logits(loaded, inputs), _logits(theirs, inputs), atol=ATOL, rtol=0)
    trainable = PeftModel.from_pretrained(copy.deepcopy(base).train(), tmp_path, is_trainable=True)
    assert trainable.training  # is_trainable=True leaves the training mode alone, as PEFT does


def test_bin_written_without_safetensors_loads_with_a_warning(tmp_path: Path) -> None:
    """2. safe_serialization=False (PEFT's or ours) → from_pretrained(d) reads the .bin, weights only."""
    base = make_gpt2()
    theirs, ours = _pair(lambda: copy.deepcopy(base), r=4, target_modules=["c_attn"])
    theirs.save_pretrained(tmp_path / "peft", safe_serialization=False)
    ours.save_pretrained(tmp_path / "ours", safe_serialization=False)
    assert (tmp_path / "ours" / "adapter_model.bin").exists()
    assert not (tmp_path / "ours" / "adapter_model.safetensors").exists()
    inputs = _ids()
    for directory in ("peft", "ours"):
        with pytest.warns(LorakitWarning, match=r"reading the legacy adapter_model\.bin with torch\.load\(weights_only"):
            loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / directory)
        torch.testing.assert_close(_logits(loaded, inputs), _logits(theirs, inputs), atol=ATOL, rtol=0)


class _RunsCode:
    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path("pwned"),))


def test_bin_that_weights_only_cannot_load_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2. …and what torch.load(weights_only=True) cannot load is refused, running nothing, changing nothing."""
    monkeypatch.chdir(tmp_path)
    ours = get_peft_model(make_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    ours.save_pretrained(tmp_path / "a", safe_serialization=False)
    with open(tmp_path / "a" / "adapter_model.bin", "wb") as handle:
        pickle.dump({"x": _RunsCode()}, handle, protocol=2)
    base = make_gpt2()
    before, structure = _state(base), _structure(base)
    with pytest.warns(LorakitWarning, match="legacy"), \
            pytest.raises(ValueError, match=r"could not be read as a weights-only PyTorch file"):
        PeftModel.from_pretrained(base, tmp_path / "a")
    assert not (tmp_path / "pwned").exists()
    _assert_same_state(_state(base), before)
    assert _structure(base) == structure


def test_delete_last_adapter_gives_the_base_model() -> None:
    """3. Deleting the last adapter is allowed and the model then computes the base output (as PEFT)."""
    base = make_gpt2()
    inputs = _ids()
    expected = _logits(base, inputs)
    theirs, ours = _pair(lambda: copy.deepcopy(base), r=4, target_modules=["c_attn"], modules_to_save=["ln_f"])
    assert not torch.allclose(_logits(ours, inputs), expected)
    theirs.delete_adapter("default")
    ours.delete_adapter("default")
    assert ours.peft_config == {} and ours.active_adapters == [] and theirs.active_adapters == []
    assert not ours.has_active_enabled_adapter
    torch.testing.assert_close(_logits(ours, inputs), expected, atol=0, rtol=0)
    # PEFT 0.21's PeftModel.forward then fails (has_active_enabled_adapter looks up the deleted name); its
    # inner LoraModel computes the base output, as lorakit's PeftModel does.
    torch.testing.assert_close(_logits(theirs.base_model, inputs), expected, atol=ATOL, rtol=0)
    assert _trainable(ours) == []
    ours.add_adapter("next", LoraConfig(r=2, target_modules=["c_proj"]))  # the model stays usable
    ours.set_adapter("next")
    assert _trainable(ours) and all(".next." in n for n in _trainable(ours))


def test_delete_merged_adapter_stays_refused() -> None:
    """3. …but a merged adapter cannot be deleted (its ΔW would stay in W with nothing to remove it)."""
    ours = get_peft_model(make_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    ours.merge_adapter()
    before, structure = _state(ours), _structure(ours)
    with pytest.raises(ValueError, match=r"adapter 'default' is merged.*unmerge_adapter\(\)"):
        ours.delete_adapter("default")
    _assert_same_state(_state(ours), before)
    assert _structure(ours) == structure and list(ours.peft_config) == ["default"]


@pytest.mark.parametrize("second", ["all", "lora_only"])
def test_second_adapter_training_biases_is_refused(second: str, tmp_path: Path) -> None:
    """4. Only one adapter may train the shared base biases; a second is refused before anything changes."""
    ours = get_peft_model(make_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], bias="all"))
    with pytest.raises(ValueError, match="only 1 adapter with bias"):
        peft.get_peft_model(make_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"], bias="all")).add_adapter(
            "b", peft.LoraConfig(r=2, target_modules=["c_proj"], bias=second))
    other = get_peft_model(make_gpt2(), LoraConfig(r=2, target_modules=["c_proj"], bias=second))
    other.save_pretrained(tmp_path)
    before, structure, flags = _state(ours), _structure(ours), _flags(ours)
    for attempt in (lambda: ours.add_adapter("b", LoraConfig(r=2, target_modules=["c_proj"], bias=second)),
                    lambda: ours.load_adapter(tmp_path, "b", allow_base_mismatch=True)):
        with pytest.raises(ValueError, match=r"adapter 'default' already trains the base model's biases"):
            attempt()
        _assert_same_state(_state(ours), before)
        assert _structure(ours) == structure and _flags(ours) == flags and list(ours.peft_config) == ["default"]
    ours.add_adapter("c", LoraConfig(r=2, target_modules=["c_proj"]))  # bias="none" is fine


def test_disable_adapter_freezes_adapter_parameters_and_restores_flags() -> None:
    """5. Inside disable_adapter() no adapter parameter requires grad (as PEFT); the exact flags return."""
    theirs, ours = _pair(make_gpt2, r=4, target_modules=["c_attn"], modules_to_save=["ln_f"])
    ours.add_adapter("other", LoraConfig(r=2, target_modules=["c_proj"]))
    ours.set_requires_grad("other")  # an inactive adapter the user made trainable
    a = ours.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight
    a.requires_grad_(False)  # …and one factor they froze
    before = _flags(ours)
    with ours.disable_adapter(), theirs.disable_adapter():
        lora = [n for n in _trainable(ours) if "lora_" in n or "modules_to_save" in n]
        assert lora == [] == [n for n in _trainable(theirs) if "lora_" in n or "modules_to_save" in n]
        assert not ours.has_active_enabled_adapter and not theirs.has_active_enabled_adapter
    assert _flags(ours) == before
    assert ours.has_active_enabled_adapter


class GRUNet(nn.Module):
    """Linear → GRU (returns a tuple) → Linear; input (N, T, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.gru = nn.GRU(4, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.gru(self.proj(x))
        return self.head(hidden[:, -1])


def test_mixed_batch_through_a_tuple_returning_saved_module_names_it() -> None:
    """6. A modules_to_save module returning a tuple (nn.GRU) in a mixed batch: a TypeError naming it."""
    ours = get_peft_model(GRUNet(), LoraConfig(r=2, target_modules=["proj"], modules_to_save=["gru"]))
    ours.add_adapter("b", LoraConfig(r=2, target_modules=["proj"]))
    x = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match=r"modules_to_save module 'gru': GRU returns a tuple, not a tensor"):
        ours(x, adapter_names=["default", "b"])
    assert all(getattr(m, "batch_plan", None) is None for m in ours.modules())  # the plan was cleared
    assert ours(x).shape == (2, 2)  # an ordinary forward still runs the saved GRU copy


def test_two_active_adapters_saving_the_same_module_are_refused() -> None:
    """7. Activating two adapters that each keep a copy of one modules_to_save module is refused."""
    ours = get_peft_model(ToyNet(), LoraConfig(r=2, target_modules=["mlp"], modules_to_save=["head"]))
    ours.add_adapter("b", LoraConfig(r=2, target_modules=["mlp"], modules_to_save=["head"]))
    _train_like(ours)
    before, flags = _state(ours), _flags(ours)
    for activate in (lambda: ours.set_adapter(["default", "b"]), lambda: ours.base_model.set_adapter(["default", "b"])):
        with pytest.raises(ValueError, match=r"adapters \['default', 'b'\] each keep their own trained copy of 'head'"):
            activate()
        assert ours.active_adapters == ["default"] and _flags(ours) == flags
        _assert_same_state(_state(ours), before)
    ids = torch.randint(0, 20, (2, 8))
    ours(ids, adapter_names=["default", "b"])  # a mixed batch gives each row its own copy: allowed


@pytest.mark.parametrize("is_trainable", [True, False])
def test_load_adapter_trainability_and_other_flags(is_trainable: bool, tmp_path: Path) -> None:
    """8. load_adapter(is_trainable=True) makes the (inactive) adapter trainable; other flags stay as set."""
    base = make_gpt2()
    saved = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["c_proj"], modules_to_save=["ln_f"]))
    _train_like(saved)
    saved.save_pretrained(tmp_path)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["c_attn"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["c_attn"]))
    for model in (ours, theirs):  # flags the user set by hand
        model.base_model.model.transformer.wte.weight.requires_grad_(True)
        model.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight.requires_grad_(False)
    before = _flags(ours)
    ours.load_adapter(tmp_path, "second", is_trainable=is_trainable)
    theirs.load_adapter(tmp_path, "second", is_trainable=is_trainable)
    assert ours.active_adapters == ["default"]
    after = _flags(ours)
    new = [n for n in after if ".second." in n]
    assert new and all(after[n] is is_trainable for n in new)
    # Every other parameter keeps its flag (newly wrapped base weights under their new names).
    def unwrapped(flags: dict[str, bool]) -> dict[str, bool]:
        return {n.replace(".base_layer", "").replace(".original_module", ""): f for n, f in flags.items()
                if ".second." not in n}

    assert unwrapped(after) == unwrapped(before)
    assert _trainable(ours) == _trainable(theirs)


def test_peft_written_pattern_key_matching_nothing_loads_with_one_warning(tmp_path: Path) -> None:
    """9. PEFT ignores rank/alpha_pattern keys that match no target; its files load here, with a warning."""
    base = make_gpt2()
    config = dict(r=4, target_modules=["c_attn", "c_proj"], rank_pattern={"c_proj": 2, "q_proj": 3},
                  alpha_pattern={"k_proj": 7})
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    _train_like(theirs)
    theirs.save_pretrained(tmp_path)
    with pytest.warns(LorakitWarning, match=r"ignoring rank_pattern\['q_proj'\], alpha_pattern\['k_proj'\]") as seen:
        ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert len([w for w in seen if issubclass(w.category, LorakitWarning)]) == 1
    assert ours.base_model.model.transformer.h[0].attn.c_proj.r["default"] == 2
    inputs = _ids()
    torch.testing.assert_close(_logits(ours, inputs), _logits(theirs, inputs), atol=ATOL, rtol=0)
    model = make_gpt2()
    before, structure = _state(model), _structure(model)
    with pytest.raises(ValueError, match=r"rank_pattern key 'q_proj' matches no targeted module"):
        get_peft_model(model, LoraConfig(**config))  # what a user writes keeps refusing it
    _assert_same_state(_state(model), before)
    assert _structure(model) == structure


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("autocast", [True, False])
def test_autocast_adapter_dtype(autocast: bool, tmp_path: Path) -> None:
    """autocast_adapter_dtype: True keeps bf16 layers' factors in fp32, False in bf16 (as PEFT)."""
    base = make_llama().to(torch.bfloat16)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"]),
                                 autocast_adapter_dtype=autocast)
    ours = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"]),
                          autocast_adapter_dtype=autocast)
    dtypes = {p.dtype for n, p in ours.named_parameters() if "lora_" in n}
    assert dtypes == {p.dtype for n, p in theirs.named_parameters() if "lora_" in n}
    assert dtypes == {torch.float32 if autocast else torch.bfloat16}
    _train_like(theirs)
    _copy_adapter_weights(theirs, ours)
    inputs = _ids()
    torch.testing.assert_close(_logits(ours, inputs).float(), _logits(theirs, inputs).float(), atol=0.05, rtol=0.02)
    ours.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, autocast_adapter_dtype=autocast)
    assert {p.dtype for n, p in loaded.named_parameters() if "lora_" in n} == dtypes


def test_from_pretrained_config_replaces_the_files_config(tmp_path: Path) -> None:
    """from_pretrained(config=…) uses that config (here another lora_alpha), as PEFT does."""
    base = make_gpt2()
    theirs, _ = _pair(lambda: copy.deepcopy(base), r=4, lora_alpha=8, target_modules=["c_attn"])
    theirs.save_pretrained(tmp_path)
    inputs = _ids()
    plain = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ours = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path,
                                     config=LoraConfig(r=4, lora_alpha=32, target_modules=["c_attn"]))
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path,
                                               config=peft.LoraConfig(r=4, lora_alpha=32, target_modules=["c_attn"]))
    assert ours.peft_config["default"].lora_alpha == 32
    assert not torch.allclose(_logits(ours, inputs), _logits(plain, inputs))
    torch.testing.assert_close(_logits(ours, inputs), _logits(reference, inputs), atol=ATOL, rtol=0)
    with pytest.raises(TypeError, match="config must be a lorakit LoraConfig"):
        PeftModel.from_pretrained(make_gpt2(), tmp_path, config={"r": 4})  # type: ignore[arg-type]
    model = copy.deepcopy(base)
    before, structure = _state(model), _structure(model)
    with pytest.raises(ValueError, match=r"rank_pattern key 'q_proj' matches no targeted module"):
        PeftModel.from_pretrained(model, tmp_path, config=LoraConfig(r=4, target_modules=["c_attn"],
                                                                     rank_pattern={"q_proj": 2}))
    _assert_same_state(_state(model), before)
    assert _structure(model) == structure


def test_torch_device_is_validated_before_anything_changes(tmp_path: Path) -> None:
    """torch_device: where the file's tensors are read; a bad device is refused with the model unchanged."""
    base = make_gpt2()
    saved = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    saved.save_pretrained(tmp_path)
    inputs = _ids()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, torch_device="cpu")
    torch.testing.assert_close(_logits(loaded, inputs), _logits(saved, inputs), atol=0, rtol=0)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, torch_device="cpu")
    torch.testing.assert_close(_logits(loaded, inputs), _logits(reference, inputs), atol=ATOL, rtol=0)
    before, structure = _state(base), _structure(base)
    with pytest.raises(ValueError, match=r"torch_device='gpu0' is not a device"):
        PeftModel.from_pretrained(base, tmp_path, torch_device="gpu0")
    _assert_same_state(_state(base), before)
    assert _structure(base) == structure
    with pytest.raises(ValueError, match=r"torch_device='gpu0'"):
        loaded.load_adapter(tmp_path, "b", torch_device="gpu0")
    assert list(loaded.peft_config) == ["default"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_device_cuda_stages_the_file_on_the_gpu(tmp_path: Path) -> None:
    base = make_gpt2()
    saved = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    saved.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, torch_device="cuda")
    assert all(p.device.type == "cpu" for p in loaded.parameters())  # the adapter lives with its base layer
    inputs = _ids()
    torch.testing.assert_close(_logits(loaded, inputs), _logits(saved, inputs), atol=0, rtol=0)


def test_low_cpu_mem_usage_skips_initialisation(tmp_path: Path) -> None:
    """low_cpu_mem_usage=True: the factors are allocated, not initialised (no random draws), then loaded."""
    base = make_gpt2()
    theirs, ours = _pair(lambda: copy.deepcopy(base), r=4, target_modules=["c_attn"], modules_to_save=["ln_f"])
    ours.save_pretrained(tmp_path)
    inputs = _ids()
    rng = torch.get_rng_state()
    fast = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    assert torch.equal(torch.get_rng_state(), rng)  # nothing was drawn for an init that would be overwritten
    PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert not torch.equal(torch.get_rng_state(), rng)  # the ordinary path does initialise first
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(_logits(fast, inputs), _logits(reference, inputs), atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(fast, inputs), _logits(theirs, inputs), atol=ATOL, rtol=0)
    fast.load_adapter(tmp_path, "again", low_cpu_mem_usage=True)
    fast.set_adapter("again")
    torch.testing.assert_close(_logits(fast, inputs), _logits(theirs, inputs), atol=ATOL, rtol=0)


def test_load_adapter_returns_missing_and_unexpected_keys(tmp_path: Path) -> None:
    theirs, ours = _pair(make_gpt2, r=4, target_modules=["c_attn"])
    ours.save_pretrained(tmp_path)
    result = ours.load_adapter(tmp_path, "second")
    reference = theirs.load_adapter(tmp_path, "second")
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    assert (list(reference.missing_keys), list(reference.unexpected_keys)) == ([], [])


def _with_poisoned_factor(model: PeftModel, value: float) -> None:
    with torch.no_grad():
        model.base_model.model.transformer.h[1].attn.c_attn.lora_B["default"].weight[0, 0] = value


@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_refuses_non_finite_weights_bit_identically(how: str) -> None:
    """safe_merge=True: a merge that would give inf/NaN raises and leaves every weight bit-identical."""
    theirs = peft.get_peft_model(make_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    _with_poisoned_factor(theirs, float("inf"))
    with pytest.raises(ValueError):  # PEFT refuses it too
        getattr(theirs, how)(safe_merge=True)
    ours = get_peft_model(make_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    _with_poisoned_factor(ours, float("inf"))
    before, structure = _state(ours), _structure(ours)
    with pytest.raises(ValueError, match=r"safe_merge: merging adapter\(s\) \['default'\] into "
                                         r"'transformer\.h\.1\.attn\.c_attn' would give NaN or infinity"):
        getattr(ours, how)(safe_merge=True)
    _assert_same_state(_state(ours), before)
    assert _structure(ours) == structure and ours.merged_adapters == []


def test_safe_merge_catches_float16_overflow() -> None:
    """The check rounds as the merge does: a float16 weight pushed past 65504 is caught (fp32 would not be)."""
    ours = get_peft_model(make_gpt2().half(), LoraConfig(r=1, lora_alpha=1, target_modules=["c_attn"],
                                                         init_lora_weights=False))
    layer = ours.base_model.model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        layer.base_layer.weight[0, 0] = 65000.0
        for factor in layer.factors("default"):
            factor.zero_()
        layer.lora_A["default"].weight[0, 0] = 100.0
        layer.lora_B["default"].weight[0, 0] = 10.0  # ΔW[0, 0] = 1000: finite in fp32, inf in fp16
    before = _state(ours)
    with pytest.raises(ValueError, match="would give NaN or infinity"):
        ours.merge_adapter(safe_merge=True)
    _assert_same_state(_state(ours), before)


def test_safe_merge_of_finite_adapters_equals_peft() -> None:
    theirs, ours = _pair(make_gpt2, r=4, target_modules=["c_attn"])
    inputs = _ids()
    expected = _logits(ours, inputs)
    ours.merge_adapter(safe_merge=True)
    theirs.merge_adapter(safe_merge=True)
    assert ours.merged_adapters == ["default"]
    torch.testing.assert_close(_logits(ours, inputs), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(ours, inputs), _logits(theirs, inputs), atol=ATOL, rtol=0)


def test_merge_and_unload_adapter_names_and_progressbar(capsys: pytest.CaptureFixture[str]) -> None:
    """merge_and_unload(adapter_names=["b"]) merges b (not the active adapter); progressbar shows a bar."""
    base = make_gpt2()
    theirs, ours = _pair(lambda: copy.deepcopy(base), r=4, target_modules=["c_attn"])
    for model, config in ((theirs, peft.LoraConfig), (ours, LoraConfig)):
        model.add_adapter("b", config(r=2, target_modules=["c_proj"], init_lora_weights=False))
    _copy_adapter_weights(theirs, ours)
    inputs = _ids()
    merged = ours.merge_and_unload(progressbar=True, adapter_names=["b"])
    reference = theirs.merge_and_unload(adapter_names=["b"])
    assert "Unloading and merging model" in capsys.readouterr().err
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(_logits(merged, inputs), _logits(reference, inputs), atol=ATOL, rtol=0)
    assert not torch.allclose(_logits(merged, inputs), _logits(base, inputs))


def test_set_adapter_inference_mode_and_set_requires_grad() -> None:
    """set_adapter(name, inference_mode=True) freezes it; set_requires_grad toggles any adapter's grads."""
    theirs, ours = _pair(make_gpt2, r=4, target_modules=["c_attn"], modules_to_save=["ln_f"])
    for model, config in ((theirs, peft.LoraConfig), (ours, LoraConfig)):
        model.add_adapter("b", config(r=2, target_modules=["c_proj"]))
    assert _trainable(ours) == _trainable(theirs)  # the new adapter is frozen, the rest untouched
    for model in (theirs, ours):
        model.set_adapter("b", inference_mode=True)
    assert _trainable(ours) == [] == _trainable(theirs)
    for model in (theirs, ours):
        model.set_adapter("default")
    assert _trainable(ours) == _trainable(theirs) != []
    for model in (theirs, ours):
        model.set_requires_grad("b")
    assert _trainable(ours) == _trainable(theirs) and any(".b." in n for n in _trainable(ours))
    for model in (theirs, ours):
        model.set_requires_grad(["default", "b"], requires_grad=False)
    assert _trainable(ours) == _trainable(theirs) == []
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        ours.set_requires_grad("nope")


def test_disable_and_enable_adapter_layers() -> None:
    base = make_gpt2()
    inputs = _ids()
    theirs, ours = _pair(lambda: copy.deepcopy(base), r=4, target_modules=["c_attn"])
    adapted = _logits(ours, inputs)
    for model in (theirs, ours):
        model.disable_adapter_layers()
    torch.testing.assert_close(_logits(ours, inputs), _logits(base, inputs), atol=0, rtol=0)
    assert _trainable(ours) == _trainable(theirs) == []
    assert not ours.has_active_enabled_adapter
    for model in (theirs, ours):
        model.base_model.enable_adapter_layers()
    torch.testing.assert_close(_logits(ours, inputs), adapted, atol=0, rtol=0)
    assert _trainable(ours) == _trainable(theirs) != []
    assert ours.has_active_enabled_adapter


def test_prefix_modules_to_save_and_the_inner_models_adapter_idiom() -> None:
    """model.prefix, model.modules_to_save, model.base_model.set_adapter([...]) / .active_adapter(s)."""
    theirs, ours = _pair(make_gpt2, r=4, target_modules=["c_attn"], modules_to_save=["ln_f"])
    for model, config in ((theirs, peft.LoraConfig), (ours, LoraConfig)):
        model.add_adapter("b", config(r=2, target_modules=["c_proj"], init_lora_weights=False))
    _copy_adapter_weights(theirs, ours)
    assert ours.prefix == theirs.prefix == "lora_"
    assert ours.modules_to_save == theirs.modules_to_save == {"ln_f"}
    assert get_peft_model(make_gpt2(), LoraConfig(target_modules=["c_attn"])).modules_to_save is None
    for model in (theirs, ours):
        model.base_model.set_adapter(["default", "b"])
    assert ours.base_model.active_adapter == theirs.base_model.active_adapter == ["default", "b"]
    assert ours.active_adapters == theirs.active_adapters == ["default", "b"]
    inputs = _ids()
    torch.testing.assert_close(_logits(ours, inputs), _logits(theirs, inputs), atol=ATOL, rtol=0)
    assert _trainable(ours) == _trainable(theirs)


def test_in_and_out_features_on_every_layer_kind() -> None:
    theirs = peft.get_peft_model(ToyNet(), peft.LoraConfig(r=2, target_modules=["emb", "conv1d", "conv2d", "mlp"]))
    ours = get_peft_model(ToyNet(), LoraConfig(r=2, target_modules=["emb", "conv1d", "conv2d", "mlp"]))
    gpt2 = get_peft_model(make_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    layer = gpt2.base_model.model.transformer.h[0].attn.c_attn
    assert (layer.in_features, layer.out_features) == (32, 96)
    for name in ("emb", "conv1d", "conv2d", "mlp"):
        mine, reference = getattr(ours.base_model.model, name), getattr(theirs.base_model.model, name)
        assert (mine.in_features, mine.out_features) == (reference.in_features, reference.out_features), name


def test_get_and_set_peft_model_state_dict() -> None:
    base = make_gpt2()
    theirs, ours = _pair(lambda: copy.deepcopy(base), r=4, target_modules=["c_attn"], modules_to_save=["ln_f"],
                         bias="lora_only")
    mine = lorakit.get_peft_model_state_dict(ours)
    reference = peft.get_peft_model_state_dict(theirs)
    assert sorted(mine) == sorted(reference)
    for key in mine:
        torch.testing.assert_close(mine[key], reference[key], atol=0, rtol=0)
    fresh = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["ln_f"],
                                                           bias="lora_only"))
    result = lorakit.set_peft_model_state_dict(fresh, reference)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    inputs = _ids()
    torch.testing.assert_close(_logits(fresh, inputs), _logits(theirs, inputs), atol=ATOL, rtol=0)
    partial = {k: v for k, v in mine.items() if "h.1." not in k}
    missing = lorakit.set_peft_model_state_dict(fresh, partial).missing_keys
    assert missing == ["base_model.model.transformer.h.1.attn.c_attn.base_layer.bias",
                       "base_model.model.transformer.h.1.attn.c_attn.lora_A.default.weight",
                       "base_model.model.transformer.h.1.attn.c_attn.lora_B.default.weight"]


def test_set_peft_model_state_dict_refuses_foreign_keys_unchanged() -> None:
    ours = get_peft_model(make_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    good = lorakit.get_peft_model_state_dict(ours)
    wrong = {k: torch.ones_like(v) for k, v in good.items()}
    wrong["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"] = torch.zeros(4, 32)
    wrong["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"] = torch.zeros(3, 3)
    before = _state(ours)
    with pytest.raises(ValueError, match=r"changed nothing: keys that are not adapter 'default''s \(1\): "
                                         r".*c_fc\.lora_A\.weight; shape mismatches \(1\)"):
        lorakit.set_peft_model_state_dict(ours, wrong)
    _assert_same_state(_state(ours), before)


@pytest.mark.parametrize(("make", "expected"), [(make_llama, {"q_proj", "v_proj"}), (make_gpt2, {"c_attn"})])
def test_target_modules_none_uses_peft_defaults(make: Any, expected: set[str], tmp_path: Path) -> None:
    import json

    from safetensors import safe_open

    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=2))
    with pytest.warns(LorakitWarning, match=r"target_modules=None: using PEFT's default targets for model_type"):
        ours = get_peft_model(make(), LoraConfig(r=2))
    assert set(ours.peft_config["default"].target_modules) == set(theirs.peft_config["default"].target_modules) == expected
    assert _trainable(ours) == _trainable(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    keys = []
    for directory in ("peft", "ours"):
        with safe_open(str(tmp_path / directory / "adapter_model.safetensors"), "pt") as handle:
            keys.append(sorted(handle.keys()))
        saved = json.loads((tmp_path / directory / "adapter_config.json").read_text())["target_modules"]
        assert set(saved) == expected  # the chosen defaults are what the file records
    assert keys[0] == keys[1]


def test_target_modules_none_on_an_unknown_architecture_is_peft_error() -> None:
    with pytest.raises(ValueError, match="Please specify `target_modules`"):
        peft.get_peft_model(ToyNet(), peft.LoraConfig(r=2))
    model = ToyNet()
    before, structure = _state(model), _structure(model)
    with pytest.raises(ValueError, match=r"Please specify `target_modules` in `peft_config`: target_modules=None "
                                         r"has no default for ToyNet"):
        get_peft_model(model, LoraConfig(r=2))
    _assert_same_state(_state(model), before)
    assert _structure(model) == structure


def _front_matter(text: str) -> dict[str, Any]:
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_save_pretrained_writes_a_model_card_like_peft(tmp_path: Path) -> None:
    theirs, ours = _pair(make_llama, r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    ours.peft_config["default"].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    mine = _front_matter((tmp_path / "ours" / "README.md").read_text())
    reference = _front_matter((tmp_path / "peft" / "README.md").read_text())
    assert mine["library_name"] == reference["library_name"] == "peft"
    assert mine["pipeline_tag"] == reference["pipeline_tag"] == "text-generation"
    assert mine["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert {"lora", "transformers"} <= set(mine["tags"]) and {"lora", "transformers"} <= set(reference["tags"])
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in mine["tags"]
    ours.save_pretrained(tmp_path / "ours")  # our own card is refreshed, not duplicated
    assert (tmp_path / "ours" / "README.md").read_text().count("library_name") == 1


def test_save_pretrained_keeps_the_users_card(tmp_path: Path) -> None:
    ours = get_peft_model(make_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    tmp_path.joinpath("README.md").write_text("# My adapter\nhand-written\n")
    ours.save_pretrained(tmp_path)
    assert tmp_path.joinpath("README.md").read_text() == "# My adapter\nhand-written\n"
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_push_to_hub_names_save_pretrained() -> None:
    ours = get_peft_model(make_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    with pytest.raises(RuntimeError, match=r"lorakit never contacts a model hub\. Call save_pretrained\(directory\)"):
        ours.push_to_hub("me/my-adapter")


# ---------------------------------------------------------------------------------------------- deliberate differences
def test_difference_base_fingerprint_refusal(tmp_path: Path) -> None:
    """PEFT loads an adapter into any base of the right shapes; lorakit refuses another base's weights."""
    saved = get_peft_model(make_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    saved.save_pretrained(tmp_path)
    torch.manual_seed(1)
    other = make_gpt2()
    peft.PeftModel.from_pretrained(copy.deepcopy(other), tmp_path)  # PEFT: silently accepted
    before = _state(other)
    with pytest.raises(ValueError, match="saved for a different base model.*allow_base_mismatch=True"):
        PeftModel.from_pretrained(other, tmp_path)
    _assert_same_state(_state(other), before)
    PeftModel.from_pretrained(other, tmp_path, allow_base_mismatch=True)


def test_difference_mixed_batches_in_training_mode() -> None:
    """PEFT refuses adapter_names in training mode; lorakit trains through a mixed batch."""
    theirs, ours = _pair(make_gpt2, r=4, target_modules=["c_attn"])
    ours.add_adapter("b", LoraConfig(r=2, target_modules=["c_attn"]))
    theirs.add_adapter("b", peft.LoraConfig(r=2, target_modules=["c_attn"]))
    theirs.train()
    ours.train()
    inputs = _ids()
    with pytest.raises(ValueError):
        theirs(inputs, adapter_names=["default", "b"])
    ours(inputs, adapter_names=["default", "b"]).logits.sum().backward()
    a = ours.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight
    assert a.grad is not None and bool(a.grad.abs().sum() > 0)


def test_difference_unmerge_is_bit_exact() -> None:
    ours = get_peft_model(make_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    randomize_lora(ours)
    before = _state(ours)
    for _ in range(3):
        ours.merge_adapter()
        ours.unmerge_adapter()
    _assert_same_state(_state(ours), before)


def test_difference_user_pattern_keys_matching_nothing_are_errors() -> None:
    """PEFT silently ignores a rank_pattern key that matches nothing (a typo); a LoraConfig here refuses it."""
    peft.get_peft_model(make_gpt2(), peft.LoraConfig(target_modules=["c_attn"], rank_pattern={"c_atn": 2}))
    with pytest.raises(ValueError, match=r"rank_pattern key 'c_atn' matches no targeted module"):
        get_peft_model(make_gpt2(), LoraConfig(target_modules=["c_attn"], rank_pattern={"c_atn": 2}))


def test_difference_load_adapter_keeps_the_training_mode(tmp_path: Path) -> None:
    """PEFT's load_adapter(is_trainable=False) switches the whole model to eval mode; lorakit leaves it."""
    theirs, ours = _pair(make_gpt2, r=4, target_modules=["c_attn"])
    ours.save_pretrained(tmp_path)
    theirs.train()
    ours.train()
    theirs.load_adapter(tmp_path, "b")
    ours.load_adapter(tmp_path, "b")
    assert not theirs.training and ours.training


def test_difference_active_adapter_when_none_is_left() -> None:
    """After the last adapter is deleted PEFT's active_adapter still names it; lorakit raises."""
    ours = get_peft_model(make_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    ours.delete_adapter("default")
    with pytest.raises(ValueError, match="no adapter is active"):
        _ = ours.active_adapter
    assert ours.base_model.active_adapter == []


def test_difference_disable_adapter_layers_refused_while_merged() -> None:
    """PEFT lets disable_adapter_layers() run on merged weights (the output is then not the base's); lorakit
    refuses, changing nothing."""
    ours = get_peft_model(make_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    ours.merge_adapter()
    before, flags = _state(ours), _flags(ours)
    with pytest.raises(ValueError, match=r"merged into the base weights.*unmerge_adapter\(\) first"):
        ours.disable_adapter_layers()
    _assert_same_state(_state(ours), before)
    assert _flags(ours) == flags and ours.has_active_enabled_adapter


def test_copies_keep_their_own_adapter_state() -> None:
    """model.base_model drives its own PeftModel: a deepcopy's inner model drives the copy, not the original."""
    ours = get_peft_model(make_gpt2(), LoraConfig(r=4, target_modules=["c_attn"]))
    ours.add_adapter("b", LoraConfig(r=2, target_modules=["c_proj"]))
    twin = copy.deepcopy(ours)
    twin.base_model.set_adapter("b")
    assert twin.active_adapters == ["b"] and ours.active_adapters == ["default"]
    assert twin.base_model.peft_config is twin.peft_config


def test_difference_set_adapter_sets_the_whole_trainable_set() -> None:
    """PEFT's set_adapter toggles only adapter parameters; lorakit's makes the trainable set exactly the active
    adapters' (plus their biases per ``bias``), re-freezing base weights the user had unfrozen."""
    theirs, ours = _pair(make_gpt2, r=4, target_modules=["c_attn"])
    for model in (theirs, ours):
        model.base_model.model.transformer.wte.weight.requires_grad_(True)
        model.set_adapter("default")
    assert "base_model.model.transformer.wte.weight" in _trainable(theirs)
    assert all("lora_" in n for n in _trainable(ours))
