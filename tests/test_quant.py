"""Quantized bases (lorakit.quant): NF4/int8 linear layers under LoRA, on CPU (and CUDA where present)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_llama, randomize_lora
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.quant import QuantizedLinear, dequantize_model, quantize_model, quantized_weight_bytes

pytest.importorskip("bitsandbytes", reason="the [quant] extra (bitsandbytes) is part of [dev]")

QUANT_TYPES = ["nf4", "int8"]


def _ids(batch: int = 4, length: int = 16) -> torch.Tensor:
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(1))


def _lora_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n}


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_layer_forward_and_input_gradient_equal_the_dequantized_dense_layer(quant_type: str) -> None:
    linear = nn.Linear(96, 80)
    layer = QuantizedLinear(linear, quant_type)
    dense = layer.dequantize()
    assert dense.shape == (80, 96) and dense.dtype == torch.float32
    # The quantization error is the format's, not a bug: NF4 ~10 % of |w|, int8 < 1 %.
    error = (dense - linear.weight).abs().mean() / linear.weight.abs().mean()
    assert error < (0.15 if quant_type == "nf4" else 0.01)
    x = torch.randn(3, 5, 96, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_(True)
    y = layer(x)
    expected = F.linear(x_dense, dense, linear.bias)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, x_dense.grad, atol=1e-5, rtol=1e-5)
    assert [n for n, _ in layer.named_parameters()] == ["bias"]  # no weight parameter to train


def _expected_bytes(quant_type: str, out_features: int, in_features: int) -> int:
    n = out_features * in_features
    if quant_type == "nf4":
        blocks = n // 64
        # codes (4 bits each) + one uint8 absmax per block + offset (fp32) + fp32 absmax per 256 blocks
        # + the 256-entry fp32 table of the 8-bit absmax code + the 16-entry NF4 table
        return n // 2 + blocks + 4 + 4 * (blocks // 256 + (blocks % 256 > 0)) + 4 * 256 + 4 * 16
    return n + 4 * out_features  # int8 codes + one fp32 scale per output row


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_weight_bytes_are_counted_exactly(quant_type: str) -> None:
    """The bytes of the quantized storage of 576×1536 layers (SmolLM2's MLP shapes), computed by hand."""
    layer = QuantizedLinear(nn.Linear(576, 1536, bias=False), quant_type)
    assert layer.storage_bytes() == _expected_bytes(quant_type, 1536, 576)
    assert layer.storage_bytes() == {"nf4": 457500, "int8": 890880}[quant_type]
    model = nn.Sequential(nn.Linear(576, 1536, bias=False), nn.ReLU(), nn.Linear(1536, 576, bias=False))
    quantize_model(model, quant_type)
    stored, full = quantized_weight_bytes(model)
    assert full == 2 * 4 * 576 * 1536
    assert stored == _expected_bytes(quant_type, 1536, 576) + _expected_bytes(quant_type, 576, 1536)
    assert stored / full == pytest.approx(0.1293 if quant_type == "nf4" else 0.2512, abs=1e-4)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_tiny_llama_trains_on_a_quantized_base(quant_type: str) -> None:
    model = quantize_model(make_llama(), quant_type)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head stays full precision
    assert type(model.lm_head) is nn.Linear
    codes = [m.qweight.clone() for m in quantized]
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    losses = []
    peft.train()
    for _ in range(20):
        optimizer.zero_grad()
        loss = peft(input_ids=ids, labels=ids).loss
        loss.backward()
        with_grad = {n for n, p in peft.named_parameters() if p.grad is not None}
        assert with_grad == _lora_names(peft)  # gradients reach the LoRA factors and nothing else
        assert all(p.grad.abs().sum() > 0 for n, p in peft.named_parameters() if "lora_B" in n)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(torch.equal(m.qweight, c) for m, c in zip(quantized, codes, strict=True))  # the base is frozen


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantizing_before_or_after_get_peft_model_is_the_same(quant_type: str) -> None:
    base = make_llama()
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(3)
    first = get_peft_model(quantize_model(copy.deepcopy(base), quant_type), config)
    torch.manual_seed(3)
    second = quantize_model(get_peft_model(copy.deepcopy(base), config), quant_type)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(first(input_ids=ids).logits, second(input_ids=ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_parameter_count_includes_the_quantized_weights(quant_type: str) -> None:
    """`trainable of N parameters` counts a quantized layer as its out × in weights (its codes are a buffer)."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    plain = get_peft_model(make_llama(), config)
    quantized = quantize_model(get_peft_model(make_llama(), config), quant_type)
    assert quantized.get_nb_trainable_parameters() == plain.get_nb_trainable_parameters()


def _trained_on_quantized(quant_type: str) -> tuple[nn.Module, PeftModel]:
    """(fp32 base, a PeftModel on its quantized copy with non-zero B)."""
    base = make_llama()
    peft = get_peft_model(quantize_model(copy.deepcopy(base), quant_type),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(peft)
    return base, peft


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_adapter_saved_on_a_quantized_base_loads_onto_the_full_precision_base(quant_type: str, tmp_path: Path) -> None:
    base, peft = _trained_on_quantized(quant_type)
    ids = _ids()
    with torch.no_grad():
        quantized_logits = peft(input_ids=ids).logits
        with peft.disable_adapter():
            assert not torch.allclose(peft(input_ids=ids).logits, quantized_logits, atol=1e-3)  # B ≠ 0
    peft.save_pretrained(tmp_path / "adapter")
    # The fingerprint is the fp32 base's: no allow_base_mismatch needed.
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    ours, theirs = peft.state_dict(), loaded.state_dict()
    for key in _lora_names(peft):
        torch.testing.assert_close(theirs[key], ours[key], atol=0, rtol=0)
    # On the dequantized weights as a plain fp32 model, the adapter computes exactly what it did on the
    # quantized base (the two differ only in how the same W0 is stored).
    dequantized = dequantize_model(copy.deepcopy(peft.get_base_model()))
    for module in dequantized.modules():
        assert not isinstance(module, QuantizedLinear)
    plain_base = make_llama()
    plain_base.load_state_dict(_plain_state(dequantized), strict=False)
    # It is another base as far as the fingerprint goes (its weights are the rounded ones).
    on_dequantized = PeftModel.from_pretrained(plain_base, tmp_path / "adapter", allow_base_mismatch=True)
    with torch.no_grad():
        torch.testing.assert_close(on_dequantized(input_ids=ids).logits, quantized_logits, atol=1e-5, rtol=1e-5)


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights of a (dequantized) PeftModel's inner model under the plain model's key names."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_adapter_from_the_full_precision_base_loads_onto_the_quantized_base(quant_type: str, tmp_path: Path) -> None:
    base = make_llama()
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    randomize_lora(peft)
    peft.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(quantize_model(copy.deepcopy(base), quant_type), tmp_path / "adapter")
    assert isinstance(loaded.base_model.model.model.layers[0].self_attn.q_proj.base_layer, QuantizedLinear)
    # Another base is still recognised as another base.
    torch.manual_seed(7)
    other = quantize_model(make_llama(), quant_type)
    with pytest.raises(ValueError, match="different base model"):
        PeftModel.from_pretrained(other, tmp_path / "adapter")


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_merge_and_unload_returns_a_full_precision_model(quant_type: str) -> None:
    _, peft = _trained_on_quantized(quant_type)
    ids = _ids()
    with torch.no_grad():
        unmerged = peft(input_ids=ids).logits
    merged = peft.merge_and_unload()
    quantized_left = [n for n, m in merged.named_modules() if isinstance(m, QuantizedLinear)]
    assert not quantized_left
    assert type(merged.model.layers[0].mlp.down_proj) is nn.Linear
    assert merged.model.layers[0].mlp.down_proj.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_merge_adapter_is_refused_and_changes_nothing(quant_type: str) -> None:
    _, peft = _trained_on_quantized(quant_type)
    before = {k: v.clone() for k, v in peft.state_dict().items()}
    with pytest.raises(TypeError, match="merge_adapter is not supported on a quantized base.*merge_and_unload"):
        peft.merge_adapter()
    after = peft.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(layer.merged for layer in peft._lora_layers())


def test_pissa_on_a_quantized_base_is_refused_and_changes_nothing() -> None:
    model = quantize_model(make_llama(), "nf4")
    kinds = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="init_lora_weights='pissa'.*quantized base"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    assert [type(m) for m in model.modules()] == kinds


def test_tied_output_head_stays_full_precision() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, tie_word_embeddings=True)
    model = quantize_model(LlamaForCausalLM(config), "nf4")
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_cuda_forward_and_backward(quant_type: str) -> None:
    model = quantize_model(make_llama(), quant_type).to("cuda")
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    ids = _ids().cuda()
    loss = peft(input_ids=ids, labels=ids).loss
    loss.backward()
    assert {n for n, p in peft.named_parameters() if p.grad is not None} == _lora_names(peft)
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert layer.qweight.is_cuda and layer.dequantize().is_cuda


@pytest.mark.slow
def test_lorakit_train_with_quantize_and_loraplus(tmp_path: Path) -> None:
    """`lorakit train --quantize nf4 --loraplus-lr-ratio 16` end to end on a tiny Llama: the adapter it
    writes loads onto the full-precision model directory it was trained from."""
    import json

    from conftest import save_tiny_model_dir

    from lorakit.cli import main

    model_dir = Path(str(save_tiny_model_dir(tmp_path / "model")))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"is {w} short ->", "completion": " Y" if len(w) < 4 else " N"})
                            + "\n" for w in ["cat", "bird", "sun", "lamp", "sky", "rose"] * 4))
    out = tmp_path / "run"
    code = main(["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--max-steps", "4",
                 "--no-progress", "--samples", "0", "--quantize", "nf4", "--loraplus-lr-ratio", "16",
                 "--target-modules", "all-linear"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["options"]["quantize"] == "nf4" and summary["options"]["loraplus_lr_ratio"] == 16
    from lorakit.train.loop import load_causal_lm

    base, _ = load_causal_lm(model_dir)
    loaded = PeftModel.from_pretrained(base, out / "adapter")  # fingerprint: the full-precision base
    assert not any(isinstance(m, QuantizedLinear) for m in loaded.modules())


def test_lorakit_train_with_quantize_adapts_every_linear_layer_by_default(tmp_path: Path) -> None:
    """Without --target-modules, `lorakit train --quantize` trains QLoRA's all-linear adapter (plain runs
    keep q_proj+v_proj)."""
    import json

    from conftest import save_tiny_model_dir

    from lorakit.cli import main

    model_dir = Path(str(save_tiny_model_dir(tmp_path / "model")))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"is {w} short ->", "completion": " Y" if len(w) < 4 else " N"})
                            + "\n" for w in ["cat", "bird", "sun", "lamp"] * 2))
    adapted = {}
    for name, extra in (("plain", []), ("nf4", ["--quantize", "nf4"])):
        out = tmp_path / name
        assert main(["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
                     "--max-steps", "1", "--no-progress", "--samples", "0", "--threads", "1", *extra]) == 0
        keys = _safetensors_keys(out / "adapter" / "adapter_model.safetensors")
        adapted[name] = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in keys}
    assert adapted["plain"] == {"q_proj", "v_proj"}
    assert adapted["nf4"] == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return list(handle.keys())
