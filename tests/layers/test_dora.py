"""DoRA numerics: forward and gradients against the dense formula, init, merge/unmerge, adapters, batches.

Dense reference (Liu et al. 2024, §4.3 for the detached norm), with ΔW = s·B·A in (out, in) orientation:
    W′ = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖_row,   y = x·W′ᵀ + b
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_gpt2, make_llama
from torch import nn

from lorakit import LoraConfig, get_peft_model, ops
from lorakit.layers import GPT2Conv1D, Linear

ATOL = 1e-5


def _conv1d(nx: int, nf: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(nf, nx)
    nn.init.normal_(layer.bias, std=0.1)
    return layer


def _dora_layer(kind: str, k: int = 12, d: int = 10, r: int = 3, alpha: float = 6.0,
                dtype: torch.dtype = torch.float32) -> Linear:
    """A DoRA layer with random A, B, bias and a magnitude that differs from the norm (so m matters)."""
    base = nn.Linear(k, d) if kind == "linear" else _conv1d(k, d)
    base = base.to(dtype)
    layer = Linear(base) if kind == "linear" else GPT2Conv1D(base)
    layer.update_layer("default", r=r, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=False,
                       use_rslora=False, use_dora=True)
    layer.active_adapters = ["default"]
    with torch.no_grad():
        for factor in layer.factors("default"):
            factor.normal_(std=0.3)
        layer.lora_magnitude_vector["default"].uniform_(0.5, 2.0)
    return layer


def _dense(layer: Linear, x: torch.Tensor, name: str = "default") -> torch.Tensor:
    """y = x·W′ᵀ + b from the formula, W′ formed explicitly, the norm detached."""
    a, b = layer.factors(name)
    m = layer.lora_magnitude_vector[name]
    w0 = layer.base_layer.weight.detach().float()
    w0 = w0.t() if layer.fan_in_fan_out else w0  # (out, in)
    direction = w0 + layer.scaling[name] * (b @ a)
    norm = direction.detach().norm(dim=1)
    w_prime = (m / norm)[:, None] * direction
    bias = layer.base_layer.bias
    return x @ w_prime.t() + (0 if bias is None else bias.detach())


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("fused", [True, False])
def test_forward_and_grads_equal_dense_formula(kind: str, fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = _dora_layer(kind)
    x = torch.randn(4, 5, 12, requires_grad=True)
    calls = []
    kernel = ops.dora_linear
    monkeypatch.setattr(ops, "dora_linear", lambda *args: calls.append(1) or kernel(*args))
    with ops.use_fused(fused):
        y = layer(x)
    assert len(calls) == int(fused)  # each path really ran
    expected = _dense(layer, x)
    torch.testing.assert_close(y, expected, atol=ATOL, rtol=0)

    g = torch.randn_like(y)
    params = [*layer.factors("default"), layer.lora_magnitude_vector["default"], x]
    ours = torch.autograd.grad(y, params, g)
    reference = torch.autograd.grad(expected, params, g)
    for name, mine, ref in zip(("A", "B", "m", "x"), ours, reference, strict=True):
        assert ref.abs().max() > 0, name
        torch.testing.assert_close(mine, ref, atol=ATOL, rtol=1e-5, msg=f"grad of {name}")


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_inference_forward_and_dropout_path(kind: str) -> None:
    layer = _dora_layer(kind)
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _dense(layer, x), atol=ATOL, rtol=0)
    # Active dropout (PEFT's rule): y = W0·x + b + (f − 1)·W0·drop(x) + f·s·B·A·drop(x).
    layer.lora_dropout["default"] = nn.Dropout(0.5)
    layer.train()
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    a, b = layer.factors("default")
    w0 = layer._weight_as_out_in(layer.base_layer.weight)
    f = layer.lora_magnitude_vector["default"] / layer.lora_variant["default"].weight_norm(layer, "default")
    expected = (x @ w0.t() + layer.base_layer.bias + (f - 1) * (dropped @ w0.t())
                + f * (dropped @ a.t() @ b.t()) * layer.scaling["default"])
    torch.testing.assert_close(y, expected, atol=ATOL, rtol=0)


def test_weight_norm_from_small_products_equals_the_dense_norm() -> None:
    layer = _dora_layer("conv1d", k=40, d=24, r=5)
    a, b = layer.factors("default")
    dense = (layer.base_layer.weight.t() + layer.scaling["default"] * (b @ a)).norm(dim=1)
    torch.testing.assert_close(layer.lora_variant["default"].weight_norm(layer, "default"), dense.detach(),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("make", [make_gpt2, make_llama])
def test_model_equals_base_exactly_at_init(make: object, ids: torch.Tensor) -> None:
    base = make()  # type: ignore[operator]
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                           use_dora=True))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)
    layer = next(m for m in model.modules() if isinstance(m, Linear))
    magnitude = layer.lora_magnitude_vector["default"]
    w0 = layer._weight_as_out_in(layer.base_layer.weight)
    torch.testing.assert_close(magnitude, w0.norm(dim=1), atol=1e-6, rtol=1e-6)  # m starts at ‖W0‖
    assert magnitude.requires_grad and magnitude.shape == (layer.out_features,)


def _dora_model(make: object, seed: int = 1) -> nn.Module:
    base = make()  # type: ignore[operator]
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    model = get_peft_model(base, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(torch.empty_like(param).uniform_(0.5, 1.5))
    return model


@pytest.mark.parametrize("make", [make_gpt2, make_llama])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_equals_unmerged_and_unmerge_restores_w0(make: object, dtype: torch.dtype,
                                                        ids: torch.Tensor) -> None:
    model = _dora_model(make).to(dtype)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(ids).logits
        unmerged = model(ids).logits
        assert (unmerged - base_logits).abs().max() > 0.01  # the adapter (and m) change the output
        model.merge_adapter()
        merged = model(ids).logits
    atol = ATOL if dtype == torch.float32 else 0.1
    torch.testing.assert_close(merged.float(), unmerged.float(), atol=atol, rtol=0 if dtype == torch.float32 else 0.05)
    for _ in range(2):  # bit-exact over several cycles
        model.unmerge_adapter()
        for n, p in model.named_parameters():
            if n in weights:
                assert torch.equal(p, weights[n]), n
        model.merge_adapter()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, merged)


def test_merge_and_unload_equals_unmerged(ids: torch.Tensor) -> None:
    model = _dora_model(make_gpt2)
    with torch.no_grad():
        unmerged = model(ids).logits
        plain = model.merge_and_unload()
        assert not any("lora" in n for n, _ in plain.named_parameters())
        torch.testing.assert_close(plain(ids).logits, unmerged, atol=ATOL, rtol=0)


def test_disable_adapter_gives_the_base(ids: torch.Tensor) -> None:
    base = make_llama()
    model = _dora_model(lambda: copy.deepcopy(base))
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_several_adapters_forward_equals_sequential_merge(ids: torch.Tensor) -> None:
    """Active [plain, dora]: the DoRA adapter rescales what came before; merging in order gives that weight."""
    model = get_peft_model(make_gpt2(), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"],
                                                   init_lora_weights=False), "plain")
    model.add_adapter("dora", LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"], use_dora=True,
                                         init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.3)
    model.set_adapter(["plain", "dora"])
    with torch.no_grad():
        both = model(ids).logits
        model.set_adapter("plain")
        only_plain = model(ids).logits
        assert (both - only_plain).abs().max() > 0.01
        model.set_adapter(["plain", "dora"])
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, both, atol=ATOL, rtol=0)
    model.unmerge_adapter()
    model.delete_adapter("dora")
    assert not any("lora_magnitude_vector" in n for n, _ in model.named_parameters())


def test_mixed_batch_rows_equal_single_adapter_outputs(ids: torch.Tensor) -> None:
    model = get_peft_model(make_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False), "plain")
    model.add_adapter("dora", LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "o_proj"], use_dora=True,
                                         init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.7)
        names = ["dora", "plain", "__base__"]
        mixed = model(ids, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    single = model(ids[row:row + 1]).logits
            else:
                model.set_adapter(name)
                single = model(ids[row:row + 1]).logits
            torch.testing.assert_close(mixed[row:row + 1], single, atol=ATOL, rtol=0)


def test_training_updates_magnitudes_and_factors(ids: torch.Tensor) -> None:
    model = get_peft_model(make_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_A" in n or "lora_B" in n or "lora_magnitude_vector" in n) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert any("lora_magnitude_vector" in n for n in changed) and any("lora_B" in n for n in changed)


def test_unsupported_layers_and_arithmetic_are_refused_with_the_model_unchanged() -> None:
    from conftest import ToyNet

    toy = ToyNet()
    before = {n: p.clone() for n, p in toy.state_dict().items()}
    types = [type(m) for m in toy.modules()]
    with pytest.raises(ValueError, match=r"use_dora=True is not supported for emb \(Embedding\), conv1d \(Conv1d\); "
                                         r"DoRA supports torch\.nn\.Linear, transformers Conv1D \(GPT-2\)"):
        get_peft_model(toy, LoraConfig(target_modules=["emb", "conv1d", "mlp"], use_dora=True))
    assert [type(m) for m in toy.modules()] == types
    assert all(torch.equal(p, before[n]) for n, p in toy.state_dict().items())

    packed = nn.Linear(8, 3)
    packed.weight = nn.Parameter(torch.zeros(3, 4, dtype=torch.uint8), requires_grad=False)  # a 4-bit base's storage
    layer = Linear(packed)
    with pytest.raises(ValueError, match=r"needs a floating-point base weight, .* stores torch\.uint8"):
        layer.update_layer("default", r=2, lora_alpha=4, lora_dropout=0.0, init_lora_weights=True, use_rslora=False,
                           use_dora=True)
    assert not layer.r and not layer.lora_magnitude_vector

    model = get_peft_model(make_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], use_dora=True))
    with pytest.raises(ValueError, match=r"\['default'\] are DoRA adapters .* cannot be combined"):
        model.add_weighted_adapter(["default"], [1.0], "sum", combination_type="linear")
    from lorakit.arithmetic import resize_adapter

    with pytest.raises(ValueError, match=r"cannot be resized: .*would drop the magnitudes"):
        resize_adapter(model, "default", "small", rank=1)
    assert list(model.peft_config) == ["default"]
