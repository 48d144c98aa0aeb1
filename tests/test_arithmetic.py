"""Adapter arithmetic: combination rules (golden + PEFT parity), resize (Eckart–Young), extract."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import ToyNet, make_gpt2, randomize_lora
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.arithmetic import add_weighted_adapter, choose_rank, extract_adapter, resize_adapter
from lorakit.layers import LoraLayer


def _layers(model: nn.Module, name: str) -> dict[str, LoraLayer]:
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer) and name in m.r}


def _two_adapter_gpt2() -> nn.Module:
    """GPT-2 with adapter "a" (r=4 on c_attn, c_proj) and "b" (r=2, other alpha, c_attn only), B ≠ 0."""
    model = get_peft_model(make_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                   init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=3, target_modules=["c_attn"], init_lora_weights=False))
    randomize_lora(model)
    return model


def _expected_sum(model: nn.Module, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    out = {}
    for path, layer in _layers(model, "a").items():
        out[path] = sum(w * layer.delta_weight(n).double() for n, w in weights.items() if n in layer.r)
    return out


def _assert_deltas(model: nn.Module, name: str, expected: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    layers = _layers(model, name)
    assert sorted(layers) == sorted(expected)
    for path, layer in layers.items():
        torch.testing.assert_close(layer.delta_weight(name).double(), expected[path], atol=atol, rtol=0)


# ------------------------------------------------------------------------------------- cat / svd / linear
def test_cat_is_exact_weighted_sum_and_works_in_forward() -> None:
    model = _two_adapter_gpt2()
    add_weighted_adapter(model, ["a", "b"], [0.7, -1.3], "mix", "cat")
    _assert_deltas(model, "mix", _expected_sum(model, {"a": 0.7, "b": -1.3}))
    ranks = {p: layer.r["mix"] for p, layer in _layers(model, "mix").items()}
    assert ranks["transformer.h.0.attn.c_attn"] == 6 and ranks["transformer.h.0.attn.c_proj"] == 4
    config = model.peft_config["mix"]
    assert config.rank_pattern and all(config.alpha_pattern[k] == v for k, v in config.rank_pattern.items())
    assert all(layer.scaling["mix"] == 1.0 for layer in _layers(model, "mix").values())

    # With weights 1, 1 the combined adapter's output equals both adapters active at once.
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "both", "cat")
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        model.set_adapter(["a", "b"])
        reference = model(ids).logits
        model.set_adapter("both")
        combined = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
    assert (reference - base).abs().max() > 1e-3  # the adapters do change the output
    torch.testing.assert_close(combined, reference, atol=1e-5, rtol=1e-5)


def test_cat_covers_embedding_and_conv_layers() -> None:
    model = get_peft_model(ToyNet(), LoraConfig(r=2, target_modules=["emb", "conv1d", "conv2d", "mlp"],
                                                init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=3, lora_alpha=5, target_modules=["emb", "conv2d", "mlp"],
                                      init_lora_weights=False))
    randomize_lora(model)
    add_weighted_adapter(model, ["a", "b"], [0.5, 2.0], "mix", "cat")
    _assert_deltas(model, "mix", _expected_sum(model, {"a": 0.5, "b": 2.0}))
    add_weighted_adapter(model, ["a", "b"], [0.5, 2.0], "mix_svd", "svd", svd_rank=5)
    _assert_deltas(model, "mix_svd", _expected_sum(model, {"a": 0.5, "b": 2.0}))


def test_svd_at_full_rank_equals_cat() -> None:
    model = _two_adapter_gpt2()
    model.add_weighted_adapter(["a", "b"], [0.7, -1.3], "cat", combination_type="cat")
    model.add_weighted_adapter(["a", "b"], [0.7, -1.3], "svd", combination_type="svd", svd_rank=6)
    cat = {p: layer.delta_weight("cat").double() for p, layer in _layers(model, "cat").items()}
    _assert_deltas(model, "svd", cat)
    svd_layers = _layers(model, "svd")
    a, _ = svd_layers["transformer.h.0.attn.c_attn"].factors("svd")
    torch.testing.assert_close(a @ a.t(), torch.eye(6), atol=1e-5, rtol=0)  # A = Vᵀ: orthonormal rows


def test_svd_at_lower_rank_is_best_approximation() -> None:
    model = _two_adapter_gpt2()
    add_weighted_adapter(model, ["a", "b"], [1.0, 0.5], "low", "svd", svd_rank=3)
    for path, target in _expected_sum(model, {"a": 1.0, "b": 0.5}).items():
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        torch.testing.assert_close(_layers(model, "low")[path].delta_weight("low").double(), best, atol=1e-5, rtol=0)


def test_svd_default_rank_is_largest_source_rank() -> None:
    model = _two_adapter_gpt2()
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "mix")
    assert {layer.r["mix"] for layer in _layers(model, "mix").values()} == {4}


def test_linear_matches_closed_form() -> None:
    model = get_peft_model(make_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                   init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=2, target_modules=["c_attn"], init_lora_weights=False))
    randomize_lora(model)
    weights = {"a": 0.6, "b": -1.5}
    add_weighted_adapter(model, list(weights), list(weights.values()), "lin", "linear")
    for layer in _layers(model, "lin").values():
        ws = {n: w * layer.scaling[n] for n, w in weights.items()}
        a_new = sum(math.copysign(math.sqrt(abs(x)), x) * layer.factors(n)[0].double() for n, x in ws.items())
        b_new = sum(math.sqrt(abs(x)) * layer.factors(n)[1].double() for n, x in ws.items())
        torch.testing.assert_close(layer.delta_weight("lin").double(), (b_new @ a_new).t(), atol=1e-6, rtol=0)
        assert layer.scaling["lin"] == 1.0 and layer.r["lin"] == 4


# ------------------------------------------------------------------------------------- ties / dare (golden)
def _hand_model(a1: list[float], b1: list[float], a2: list[float], b2: list[float]) -> nn.Module:
    """Linear(3 → 2) with two r=1 adapters of scaling 1 and the given factors."""
    model = get_peft_model(nn.Sequential(nn.Linear(3, 2)), LoraConfig(r=1, lora_alpha=1, target_modules=["0"]), "x")
    model.add_adapter("y", LoraConfig(r=1, lora_alpha=1, target_modules=["0"]))
    layer = model.get_base_model()[0]
    with torch.no_grad():
        for name, a, b in (("x", a1, b1), ("y", a2, b2)):
            layer.factors(name)[0].copy_(torch.tensor([a]))
            layer.factors(name)[1].copy_(torch.tensor(b)[:, None])
    return model


HAND = ([1.0, -2.0, 3.0], [1.0, 2.0], [-4.0, 1.0, 2.0], [-1.5, 1.0])


@pytest.mark.parametrize(
    ("kind", "density", "method", "b_expected", "a_expected"),
    [
        # density 2/3 keeps 2 of 3 entries of A (|·|-largest) and 1 of 2 of B; weights (4, 1) → √ = (2, 1):
        # A: x→[0,-2,3], y→[-4,0,2]; signs of the sum [-4,-2,5] → (-,-,+); agreeing weighted entries
        #    averaged: [-4/1, -4/1, (6+2)/2]. B: x→[0,2], y→[-1.5,0]; sum [-1.5,2] → (-,+); [-1.5, 4].
        ("ties", 2 / 3, "total", [-1.5, 4.0], [-4.0, -4.0, 4.0]),
        # No pruning: A sum [-3,-1,5] → (-,-,+): x agrees at 1,2 (weighted -4, 6), y at 0,2 (-4, 2)
        # → [-4, -4, 4]; B sum [-0.5, 3] → (-,+): [-1.5, (4+1)/2].
        ("dare_ties", 1.0, "total", [-1.5, 2.5], [-4.0, -4.0, 4.0]),
        # "frequency": sign of the count of signs; A: (+,-) at 0 ties → +, so x's weighted 2 survives alone;
        # entry 1: (-,+) → +: y's 1; entry 2: (+,+): (6+2)/2. B: entry 0 (+,-) → +: 2; entry 1: (4+1)/2.
        ("ties", 1.0, "frequency", [2.0, 2.5], [2.0, 1.0, 4.0]),
        # magnitude_prune: pruned as for ties, then a plain weighted sum.
        ("magnitude_prune", 2 / 3, "total", [-1.5, 4.0], [-4.0, -4.0, 8.0]),
        # dare_linear at density 1 keeps everything: the linear rule.
        ("dare_linear", 1.0, "total", [0.5, 5.0], [-2.0, -3.0, 8.0]),
    ],
)
def test_ties_and_dare_hand_computed(kind: str, density: float, method: str, b_expected: list[float],
                                     a_expected: list[float]) -> None:
    model = _hand_model(*HAND)
    add_weighted_adapter(model, ["x", "y"], [4.0, 1.0], "m", kind, density=density, majority_sign_method=method)
    layer = model.get_base_model()[0]
    a, b = layer.factors("m")
    torch.testing.assert_close(a.detach(), torch.tensor([a_expected]), atol=1e-6, rtol=0)
    torch.testing.assert_close(b.detach(), torch.tensor(b_expected)[:, None], atol=1e-6, rtol=0)


def test_dare_drops_and_rescales_and_is_unbiased() -> None:
    model = _hand_model([1.0, -2.0, 3.0], [1.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0])
    layer = model.get_base_model()[0]
    a_sum = torch.zeros(1, 3)
    runs = 400
    for seed in range(runs):
        add_weighted_adapter(model, ["x", "y"], [1.0, 1.0], "d", "dare_linear", density=0.5, seed=seed)
        a = layer.factors("d")[0].detach()
        kept = a != 0
        torch.testing.assert_close(a[kept], 2 * torch.tensor([[1.0, -2.0, 3.0]])[kept])  # survivors × 1/density
        a_sum += a
        model.delete_adapter("d")
    torch.testing.assert_close(a_sum / runs, torch.tensor([[1.0, -2.0, 3.0]]), atol=0.5, rtol=0)
    # Same seed, same masks.
    add_weighted_adapter(model, ["x", "y"], [1.0, 1.0], "s1", "dare_ties", density=0.5, seed=7)
    add_weighted_adapter(model, ["x", "y"], [1.0, 1.0], "s2", "dare_ties", density=0.5, seed=7)
    torch.testing.assert_close(layer.factors("s1")[0], layer.factors("s2")[0], atol=0, rtol=0)


# ------------------------------------------------------------------------------------- PEFT parity
@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [("cat", {}), ("svd", {"svd_rank": 3}), ("linear", {}), ("ties", {"density": 0.5}),
     ("magnitude_prune", {"density": 0.7}), ("ties_svd", {"density": 0.5, "svd_rank": 4})],
)
def test_matches_peft_add_weighted_adapter(kind: str, kwargs: dict) -> None:
    peft = pytest.importorskip("peft")
    ours = get_peft_model(make_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                  init_lora_weights=False), "a")
    ours.add_adapter("b", LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], init_lora_weights=False))
    randomize_lora(ours)
    # PEFT warns about adapter names that occur inside "lora_" (like "a"), so its adapters are p and q.
    theirs = peft.get_peft_model(make_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                                              fan_in_fan_out=True), adapter_name="p")
    theirs.add_adapter("q", peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True))
    renamed = {k.replace(".a.", ".p.").replace(".b.", ".q."): v for k, v in ours.state_dict().items()}
    assert theirs.load_state_dict(renamed, strict=False).unexpected_keys == []
    weights = [0.8, -0.4] if kind in ("cat", "svd", "linear") else [0.8, 0.4]
    ours.add_weighted_adapter(["a", "b"], weights, "m", combination_type=kind, **kwargs)
    theirs.add_weighted_adapter(["p", "q"], weights, "m", combination_type=kind, **kwargs)
    for path, layer in _layers(ours, "m").items():
        peft_layer = theirs.base_model.model.get_submodule(path)
        torch.testing.assert_close(layer.delta_weight("m"), peft_layer.get_delta_weight("m"), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------- errors
def test_bad_calls_raise_and_change_nothing() -> None:
    model = _two_adapter_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        (dict(adapters=["a", "zz"], weights=[1, 1], adapter_name="m"), "no adapter named 'zz'"),
        (dict(adapters=["a", "b"], weights=[1], adapter_name="m"), "weights"),
        (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="a"), "already exists"),
        (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="m", combination_type="sum"), "combination_type"),
        (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="m", combination_type="ties"), "density"),
        (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="m", combination_type="linear"), "equal ranks"),
        (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="m", majority_sign_method="x"), "majority"),
        (dict(adapters=["a", "b"], weights=[1, math.nan], adapter_name="m"), "finite"),
        (dict(adapters=[], weights=[], adapter_name="m"), "at least one"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            add_weighted_adapter(model, **kwargs)
    assert sorted(model.peft_config) == ["a", "b"]
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="energy"):
        resize_adapter(model, "a", "r", energy=1.5)
    with pytest.raises(ValueError, match="rank"):
        resize_adapter(model, "a", "r")


# ------------------------------------------------------------------------------------- resize
def test_resize_to_own_rank_is_lossless() -> None:
    model = _two_adapter_gpt2()
    reports = resize_adapter(model, "a", "same", rank=4)
    expected = {p: layer.delta_weight("a").double() for p, layer in _layers(model, "a").items()}
    _assert_deltas(model, "same", expected)
    assert all(r.new_rank == 4 and r.original_rank == 4 for r in reports)
    assert all(abs(r.retained_energy - 1) < 1e-9 and r.relative_error < 1e-6 for r in reports)


def test_resize_lower_rank_is_eckart_young_and_reports_energy() -> None:
    model = _two_adapter_gpt2()
    reports = {r.module: r for r in resize_adapter(model, "a", "small", rank=2)}
    for path, layer in _layers(model, "a").items():
        delta = layer.delta_weight("a").detach().double()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        got = _layers(model, "small")[path].delta_weight("small").double()
        torch.testing.assert_close(got, best, atol=1e-6, rtol=0)
        total = float((s**2).sum())
        error2 = float(((delta - got) ** 2).sum())
        assert error2 == pytest.approx(float((s[2:] ** 2).sum()), rel=1e-6)  # Eckart–Young
        assert reports[path].retained_energy == pytest.approx(float((s[:2] ** 2).sum()) / total, rel=1e-6)
        assert reports[path].relative_error == pytest.approx(math.sqrt(error2 / total), rel=1e-5)


def test_resize_by_energy_picks_smallest_rank_per_layer() -> None:
    model = get_peft_model(make_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False), "a")
    layers = list(_layers(model, "a").values())
    spectra = [torch.tensor([4.0, 2.0, 1.0, 0.5]), torch.tensor([3.0, 0.1, 0.1, 0.1])]
    with torch.no_grad():
        for layer, s in zip(layers, spectra, strict=True):
            a, b = layer.factors("a")
            qa, _ = torch.linalg.qr(torch.randn(a.shape[1], 4))
            qb, _ = torch.linalg.qr(torch.randn(b.shape[0], 4))
            a.copy_(qa.t())
            b.copy_(qb * s / layer.scaling["a"])
    reports = resize_adapter(model, "a", "e", energy=0.9)
    # Layer 0: energies 16/21.25=0.753, 20/21.25=0.941 → k=2. Layer 1: 9/9.03=0.997 → k=1.
    assert [r.new_rank for r in reports] == [2, 1]
    assert reports[0].retained_energy == pytest.approx(20 / 21.25)
    assert model.peft_config["e"].rank_pattern  # ranks differ per layer
    assert [layer.r["e"] for layer in _layers(model, "e").values()] == [2, 1]
    assert choose_rank(torch.tensor([4.0, 2.0, 1.0, 0.5]), 1, 0.9, 4) == 1  # energy capped at rank


def test_resize_carries_modules_to_save() -> None:
    model = get_peft_model(make_gpt2(), LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["ln_f"],
                                                   init_lora_weights=False), "a")
    wrapper = model.get_base_model().transformer.ln_f
    with torch.no_grad():
        wrapper.modules_to_save["a"].weight.fill_(3.0)
    resize_adapter(model, "a", "r2", rank=2)
    assert torch.equal(wrapper.modules_to_save["r2"].weight, wrapper.modules_to_save["a"].weight)


# ------------------------------------------------------------------------------------- extract
def test_extract_is_exact_when_delta_has_low_rank() -> None:
    base = ToyNet().eval()
    finetuned = copy.deepcopy(base)
    with torch.no_grad():
        for name in ("emb", "conv1d", "conv2d", "mlp"):
            weight = finetuned.get_submodule(name).weight
            flat = weight.view(weight.shape[0], -1) if name != "emb" else weight
            flat += torch.randn(flat.shape[0], 2) @ torch.randn(2, flat.shape[1]) * 0.3  # rank-2 ΔW
    ids = torch.randint(0, 20, (4, 8))
    with torch.no_grad():
        target = finetuned(ids)
    result = extract_adapter(base, finetuned, ["emb", "conv1d", "conv2d", "mlp"], rank=2)
    assert [r.new_rank for r in result.layers] == [2, 2, 2, 2]
    assert all(r.relative_error < 1e-6 and r.retained_energy > 1 - 1e-9 for r in result.layers)
    assert result.uncaptured == []
    with torch.no_grad():
        torch.testing.assert_close(result.model(ids), target, atol=1e-5, rtol=1e-5)


def test_extract_from_full_finetune_is_closer_than_base() -> None:
    base = make_gpt2()
    finetuned = copy.deepcopy(base).train()
    # Every weight matrix of the blocks trains in full (biases, norms and the tied embedding stay: LoRA on
    # linear layers cannot represent them, and the test is about what it can).
    matrices = [p for n, p in finetuned.named_parameters() if p.dim() == 2 and ".h." in n]
    for param in finetuned.parameters():
        param.requires_grad_(any(param is m for m in matrices))
    optimizer = torch.optim.AdamW(matrices, lr=3e-3)
    data = torch.randint(0, 64, (8, 16))
    for _ in range(6):
        finetuned(data, labels=data).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    finetuned.eval()
    ids = torch.randint(0, 64, (4, 16))
    with torch.no_grad():
        target = finetuned(ids).logits
        base_gap = float((base(ids).logits - target).norm())
    gaps = {}
    for rank in (2, 8, 32):  # 32 = n_embd: full rank for every layer
        result = extract_adapter(copy.deepcopy(base), finetuned, "all-linear", rank=rank, task_type="CAUSAL_LM")
        assert result.uncaptured == []
        assert all(r.new_rank == rank and 0 < r.retained_energy <= 1 + 1e-9 for r in result.layers)
        with torch.no_grad():
            gaps[rank] = float((result.model(ids).logits - target).norm())
    assert gaps[2] < 0.9 * base_gap and gaps[8] < gaps[2] and gaps[32] < 1e-4 * base_gap
    assert result.layers[0].relative_error < 1e-6


def test_extract_rejects_mismatched_models() -> None:
    with pytest.raises(ValueError, match="share the architecture"):
        extract_adapter(make_gpt2(), make_gpt2(n_embd=48), ["c_attn"], rank=2)


def test_extract_reports_tied_weights_it_cannot_follow() -> None:
    base = make_gpt2()
    finetuned = copy.deepcopy(base)
    with torch.no_grad():
        finetuned.transformer.wte.weight += 0.1  # also GPT-2's lm_head (tied)
    result = extract_adapter(base, finetuned, ["wte"], rank=1)
    assert result.uncaptured == ["lm_head.weight (tied to transformer.wte.weight)"]


def test_combine_modules_to_save() -> None:
    model = get_peft_model(make_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["ln_f"],
                                                   init_lora_weights=False), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    wrapper = model.get_base_model().transformer.ln_f
    with torch.no_grad():
        wrapper.modules_to_save["a"].weight.fill_(2.0)
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "m", "cat")  # one owner: its trained copy is taken
    assert model.peft_config["m"].modules_to_save == ["ln_f"]
    assert torch.equal(wrapper.modules_to_save["m"].weight, wrapper.modules_to_save["a"].weight)
    model.add_adapter("c", LoraConfig(r=2, target_modules=["c_attn"], modules_to_save=["ln_f"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        add_weighted_adapter(model, ["a", "c"], [1.0, 1.0], "n", "cat")
    assert "n" not in model.peft_config
