"""Adapter analysis (paper §7): φ properties and expectation, effective rank, amplification, report, plots."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from conftest import ToyNet, make_gpt2, randomize_lora
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.analysis import (
    REPORT_SCHEMA,
    amplification_factor,
    analyze,
    effective_rank,
    energy_rank,
    format_report,
    plot_report,
    subspace_similarity,
    validate_report,
)
from lorakit.layers import LoraLayer


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR", f"{path} is not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def _gpt2_two_adapters() -> nn.Module:
    model = get_peft_model(make_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "mlp.c_proj"],
                                                   init_lora_weights=False), "r4")
    model.add_adapter("r8", LoraConfig(r=8, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False))
    randomize_lora(model)
    return model


# ------------------------------------------------------------------------------------- φ
def test_phi_of_adapter_with_itself_has_unit_diagonal() -> None:
    a = torch.randn(8, 32)
    phi = subspace_similarity(a, a)
    assert phi.shape == (8, 8)
    torch.testing.assert_close(phi.diagonal(), torch.ones(8, dtype=torch.float64), atol=1e-10, rtol=0)
    assert (phi >= 0).all() and (phi <= 1).all()


def test_phi_is_bounded_and_symmetric_in_the_papers_sense() -> None:
    a1, a2 = torch.randn(4, 20), torch.randn(8, 20)
    phi12, phi21 = subspace_similarity(a1, a2), subspace_similarity(a2, a1)
    assert phi12.shape == (4, 8) and phi21.shape == (8, 4)
    assert (phi12 >= 0).all() and (phi12 <= 1).all()
    torch.testing.assert_close(phi12, phi21.t(), atol=1e-12, rtol=0)  # φ(A1, A2, i, j) = φ(A2, A1, j, i)


def test_phi_hand_computed() -> None:
    # A1's right-singular vectors, by σ: e1 (σ=2), e2 (σ=1); A2's: e2 (σ=2), e3 (σ=1).
    a1 = torch.tensor([[2.0, 0, 0, 0], [0, 1.0, 0, 0]])
    a2 = torch.tensor([[0, 2.0, 0, 0], [0, 0, 1.0, 0]])
    phi = subspace_similarity(a1, a2)
    # φ(1,1)=(e1·e2)²=0; φ(1,2)=‖e1ᵀ[e2 e3]‖²/1=0; φ(2,1)=‖[e1 e2]ᵀe2‖²/1=1; φ(2,2)=1/2.
    torch.testing.assert_close(phi, torch.tensor([[0.0, 0.0], [1.0, 0.5]], dtype=torch.float64), atol=1e-12, rtol=0)


def test_phi_of_random_subspaces_matches_expectation() -> None:
    # For a uniformly random i-dim subspace U_i and any fixed j-dim V_j of R^d, E‖U_iᵀV_j‖² = Σ_{v∈V_j} E‖U_iᵀv‖²
    # = j·i/d, so E[φ(i, j)] = i·j/(d·min(i, j)) = max(i, j)/d. A Gaussian A has uniformly random nested
    # right-singular subspaces (rotation invariance), so averaging over draws estimates that.
    d, r1, r2, trials = 32, 4, 8, 300
    mean = sum(subspace_similarity(torch.randn(r1, d), torch.randn(r2, d)) for _ in range(trials)) / trials
    i = torch.arange(1, r1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64)[None, :]
    expected = torch.maximum(i, j).expand(r1, r2) / d
    torch.testing.assert_close(mean, expected, atol=0.012, rtol=0)


def test_phi_rejects_different_input_sizes() -> None:
    with pytest.raises(ValueError, match="same layer shape"):
        subspace_similarity(torch.randn(2, 5), torch.randn(2, 6))


# ------------------------------------------------------------------------------------- spectra
def test_effective_and_energy_rank() -> None:
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0, 0.0])) == pytest.approx(3.0)
    assert effective_rank(torch.tensor([5.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3)) == 0.0
    assert 1.0 < effective_rank(torch.tensor([3.0, 1.0])) < 2.0
    assert energy_rank(torch.tensor([3.0, 1.0])) == 1  # 9/10 reaches 0.9
    assert energy_rank(torch.tensor([2.0, 1.0, 1.0])) == 3  # 4/6, 5/6 < 0.9
    assert energy_rank(torch.tensor([2.0, 1.0, 0.5])) == 2  # 5/5.25 = 0.95
    assert energy_rank(torch.zeros(2)) == 0


def test_amplification_hand_computed() -> None:
    w0 = torch.diag(torch.tensor([10.0, 1.0, 1.0]))
    delta = 2.0 * torch.outer(torch.tensor([1.0, 0, 0]), torch.tensor([1.0, 0, 0]))
    factor, projection = amplification_factor(delta, w0, r=1)
    assert projection == pytest.approx(10.0) and factor == pytest.approx(0.2)
    # A direction W0 barely has is amplified: ΔW along e3, where W0's entry is 1 → 2/1.
    delta = 2.0 * torch.outer(torch.tensor([0, 0, 1.0]), torch.tensor([0, 0, 1.0]))
    assert amplification_factor(delta, w0, r=1)[0] == pytest.approx(2.0)


@pytest.mark.parametrize("kind", ["gpt2", "toy"])
def test_report_matches_dense_computation(kind: str) -> None:
    if kind == "gpt2":
        model = _gpt2_two_adapters()
    else:
        model = get_peft_model(ToyNet(), LoraConfig(r=2, target_modules=["emb", "conv1d", "conv2d", "mlp"],
                                                    init_lora_weights=False), "r4")
        randomize_lora(model)
    report = analyze(model, ["r4"])
    validate_report(report)
    layers = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    assert [e["module"] for e in report["adapters"][0]["layers"]] == [n for n, m in layers.items() if "r4" in m.r]
    for entry in report["adapters"][0]["layers"]:
        layer = layers[entry["module"]]
        delta = layer.delta_weight("r4").detach().double()
        w0 = layer.base_layer.weight.detach().double()
        s = torch.linalg.svdvals(delta.flatten(1))[: layer.r["r4"]]
        torch.testing.assert_close(torch.tensor(entry["singular_values"], dtype=torch.float64), s, atol=1e-6, rtol=1e-5)
        assert entry["frobenius_norm"] == pytest.approx(float(delta.norm()), rel=1e-5)
        # Amplification in the base weight's own orientation (U, V of ΔW there) is the same number.
        factor, _ = amplification_factor(delta.flatten(1), w0.flatten(1), layer.r["r4"])
        assert entry["amplification"] == pytest.approx(factor, rel=1e-4)
        assert entry["r"] == layer.r["r4"] and 1 <= entry["energy_rank_90"] <= entry["r"]


def test_comparison_section() -> None:
    model = _gpt2_two_adapters()
    report = analyze(model, ["r4", "r8"], sources={"r4": "dir/a"})
    validate_report(report)
    comparison = report["comparison"]
    assert comparison["adapters"] == ["r4", "r8"]
    assert [p["module"] for p in comparison["layers"]] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    pair = comparison["layers"][0]
    assert (pair["r1"], pair["r2"]) == (4, 8) and len(pair["phi"]) == 4 and len(pair["phi"][0]) == 8
    similarity = comparison["layer_similarity"]
    assert len(similarity["modules_1"]) == 4 and len(similarity["modules_2"]) == 2
    proj_row = similarity["modules_1"].index("transformer.h.0.mlp.c_proj")
    c_attn_row = similarity["modules_1"].index("transformer.h.0.attn.c_attn")
    assert similarity["values"][c_attn_row][0] == pytest.approx(pair["phi_full"])
    assert all(0 <= v <= 1 for row in similarity["values"] for v in row if v is not None)
    # An adapter against itself: φ(i, i) = 1 and each layer is fully similar to itself.
    assert similarity["values"][proj_row] == [None, None]  # inputs of 128 vs c_attn's 32: no common space
    model.add_adapter("r8b", LoraConfig(r=8, lora_alpha=8, target_modules=["c_attn"]))
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoraLayer) and "r8b" in layer.r:
                for mine, theirs in zip(layer.factors("r8b"), layer.factors("r8"), strict=True):
                    mine.copy_(theirs)
    same = analyze(model, ["r8", "r8b"])["comparison"]
    for pair in same["layers"]:
        assert all(pair["phi"][i][i] == pytest.approx(1.0) for i in range(8))
    assert [same["layer_similarity"]["values"][i][i] for i in range(2)] == pytest.approx([1.0, 1.0])


def test_report_is_json_and_validates_with_jsonschema_when_available() -> None:
    report = analyze(_gpt2_two_adapters(), ["r4", "r8"])
    round_trip = json.loads(json.dumps(report))
    validate_report(round_trip)
    try:
        import jsonschema
    except ImportError:
        return  # our validator (above) covers the keywords the schema uses
    jsonschema.validate(round_trip, REPORT_SCHEMA)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.pop("adapters"), "missing"),
        (lambda r: r["adapters"][0]["layers"][0].update(r="four"), "integer"),
        (lambda r: r["comparison"]["layers"][0].update(phi_full=1.5), "maximum"),
        (lambda r: r["adapters"][0]["layers"][0].update(extra=1), "unexpected"),
        (lambda r: r.update(schema_version=99), "not one of"),
        (lambda r: r["adapters"][0]["layers"][0].update(frobenius_norm=math.nan), "number"),
    ],
)
def test_validator_rejects_bad_reports(mutate: object, message: str) -> None:
    report = analyze(_gpt2_two_adapters(), ["r4", "r8"])
    mutate(report)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        validate_report(report)


# ------------------------------------------------------------------------------------- presentation
def test_table_lists_every_layer() -> None:
    report = analyze(_gpt2_two_adapters(), ["r4", "r8"])
    text = format_report(report)
    assert "adapter r4" in text and "subspace similarity φ: r4 vs r8" in text
    assert text.count("transformer.h.0.attn.c_attn") == 3  # r4 table, r8 table, comparison


def test_plots_are_written_as_pngs(tmp_path: Path) -> None:
    report = analyze(_gpt2_two_adapters(), ["r4", "r8"])
    paths = plot_report(report, tmp_path / "plots")
    names = sorted(p.name for p in paths)
    assert names == sorted(["spectrum_r4.png", "spectrum_r8.png", "amplification_r4.png", "amplification_r8.png",
                            "phi_r4_vs_r8.png", "layer_similarity_r4_vs_r8.png"])
    for path in paths:
        width, height = png_size(path)
        assert path.stat().st_size > 2000 and width >= 300 and height >= 250
    assert png_size(tmp_path / "plots" / "spectrum_r4.png") == (800, 500)  # figsize 8×5 in at 100 dpi
    assert png_size(tmp_path / "plots" / "phi_r4_vs_r8.png") == (580, 300)  # 2 panels: (2.4·2+1)×(2.4+0.6)
