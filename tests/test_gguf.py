"""GGUF interop without llama.cpp's binaries: lorakit's export equals llama.cpp's own converter, export →
import is lossless, scales are folded so llama.cpp's α/r gives lorakit's ΔW, and the merged-model file holds
the merged weights. (The check with llama.cpp itself is tests/test_llamacpp.py, opt-in.)"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import make_byte_tokenizer, randomize_lora, save_tiny_model_dir
from llamacpp_tools import run_converter
from safetensors.torch import load_file
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.cli import main
from lorakit.gguf import export_adapter, import_adapter
from lorakit.gguf.architectures import read_base_layout
from lorakit.gguf.merged import export_merged
from lorakit.gguf.storage import decode

ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]


def _load(directory: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _save_qwen2(path: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=258, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(str(path))
    make_byte_tokenizer().save_pretrained(str(path))  # type: ignore[attr-defined]
    return path


def _adapter(base_dir: Path, out: Path, **config: object) -> Path:
    peft = get_peft_model(_load(base_dir), LoraConfig(**config))  # type: ignore[arg-type]
    randomize_lora(peft)
    peft.save_pretrained(out)
    return out


def _fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _tensors(path: Path) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    return [(t.name, t.tensor_type.name, tuple(int(d) for d in t.shape), np.asarray(t.data).tobytes())
            for t in gguf.GGUFReader(path).tensors]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return Path(str(save_tiny_model_dir(tmp_path_factory.mktemp("llama") / "base", "llama")))


# ------------------------------------------------------------------------------------------------ acceptance 1
@pytest.mark.slow
@pytest.mark.parametrize("arch, outtype", [("llama", "f32"), ("llama", "q8_0"), ("qwen2", "f16")])
def test_export_equals_llama_cpp_converter(arch: str, outtype: str, llama_dir: Path, tmp_path: Path) -> None:
    """Every tensor (name, order, storage type, shape, bytes) and every KV pair equal what llama.cpp's own
    convert_lora_to_gguf.py (from the llama-cpp-python sdist) writes for the same PEFT adapter."""
    base = llama_dir if arch == "llama" else _save_qwen2(tmp_path / "qwen2")
    targets = ALL_LLAMA if arch == "llama" else ["q_proj", "k_proj", "v_proj", "down_proj", "lm_head"]
    # r=4: Q8_0 cannot split lora_b's rows of 4 into 32-value blocks, so both sides fall back to F16 there.
    adapter = _adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=targets)
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    export_adapter(adapter, base, ours, outtype=outtype)
    run_converter(adapter, base, theirs, outtype)
    assert _fields(ours) == _fields(theirs)
    assert _fields(ours)["general.type"] == "adapter" and _fields(ours)["adapter.lora.alpha"] == 8.0
    mine, reference = _tensors(ours), _tensors(theirs)
    assert [t[:3] for t in mine] == [t[:3] for t in reference]
    assert [t[3] for t in mine] == [t[3] for t in reference]
    factors = load_file(adapter / "adapter_model.safetensors")
    assert len(mine) == 2 * sum(".lora_A." in k or k.endswith("lora_embedding_A") for k in factors)


def test_export_import_f32_is_bit_identical(llama_dir: Path, tmp_path: Path) -> None:
    adapter = _adapter(llama_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=ALL_LLAMA)
    export_adapter(adapter, llama_dir, tmp_path / "a.gguf")
    config = import_adapter(tmp_path / "a.gguf", llama_dir, tmp_path / "back")
    before, after = load_file(adapter / "adapter_model.safetensors"), load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]) for k in before)
    assert (config.r, config.lora_alpha, config.rank_pattern) == (4, 8, {})
    assert sorted(config.target_modules) == sorted(ALL_LLAMA)  # type: ignore[arg-type]


def _delta_weights(peft: PeftModel) -> dict[str, torch.Tensor]:
    from lorakit.layers import LoraLayer

    return {n: m.delta_weight("default").detach() for n, m in peft.get_base_model().named_modules()
            if isinstance(m, LoraLayer) and "default" in m.r}


@pytest.mark.parametrize("outtype, rtol", [("f16", 2e-3), ("bf16", 1.6e-2), ("q8_0", 2e-2)])
def test_export_import_delta_within_outtype_rounding(outtype: str, rtol: float, llama_dir: Path,
                                                     tmp_path: Path) -> None:
    """ΔW after a lossy round trip stays within the storage type's rounding (relative Frobenius error)."""
    adapter = _adapter(llama_dir, tmp_path / "adapter", r=32, lora_alpha=16, target_modules=["q_proj", "k_proj",
                                                                                             "down_proj"])
    export_adapter(adapter, llama_dir, tmp_path / "a.gguf", outtype=outtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors}
    assert set(types.values()) == {outtype.upper()}  # r=32: Q8_0 applies to lora_b's rows too
    import_adapter(tmp_path / "a.gguf", llama_dir, tmp_path / "back")
    original = _delta_weights(PeftModel.from_pretrained(_load(llama_dir), adapter))
    restored = _delta_weights(PeftModel.from_pretrained(_load(llama_dir), tmp_path / "back"))
    assert sorted(original) == sorted(restored)
    for name, delta in original.items():
        error = float((restored[name] - delta).norm() / delta.norm())
        assert 0 < error < rtol, f"{name}: relative error {error}"


def _llama_cpp_delta(path: Path, layout_dir: Path) -> dict[str, torch.Tensor]:
    """ΔW as llama.cpp computes it from a GGUF adapter: (α / r_t)·B·A with B's rows back in HF order
    (token_embd: the pair is (Aᵀ, B); ΔW of an embedding is (B·A)ᵀ, shape (vocab, dim))."""
    layout = read_base_layout(layout_dir)
    reader = gguf.GGUFReader(path)
    alpha = float(reader.fields["adapter.lora.alpha"].contents())  # type: ignore[arg-type]
    tensors = {t.name: decode(t) for t in reader.tensors}
    by_tensor = layout.module_names_by_tensor(n for n, _ in _load(layout_dir).named_modules())
    deltas: dict[str, torch.Tensor] = {}
    for name in tensors:
        if not name.endswith(".lora_a"):
            continue
        stem = name[: -len(".lora_a")]
        module = by_tensor[stem]
        a, b = tensors[name], tensors[stem + ".lora_b"]
        scale = alpha / b.shape[-1]
        if stem.startswith("token_embd"):
            deltas[module] = scale * (b @ a.T).T
        else:
            deltas[module] = scale * (layout.from_gguf_rows(module, b) @ a)
    return deltas


@pytest.mark.parametrize("extra", [{"use_rslora": True},
                                   {"rank_pattern": {"k_proj": 2, "down_proj": 6}, "alpha_pattern": {"v_proj": 3}},
                                   {"use_rslora": True, "rank_pattern": {"embed_tokens": 3}}])
def test_scales_folded_into_b_give_lorakits_delta(extra: dict[str, object], llama_dir: Path, tmp_path: Path) -> None:
    """rsLoRA / rank_pattern / alpha_pattern: llama.cpp's one α over each pair's rank reproduces every ΔW,
    and the re-imported adapter gives the same logits."""
    adapter = _adapter(llama_dir, tmp_path / "adapter", r=4, lora_alpha=8,
                       target_modules=["q_proj", "k_proj", "v_proj", "down_proj", "embed_tokens"], **extra)
    export_adapter(adapter, llama_dir, tmp_path / "a.gguf")
    peft = PeftModel.from_pretrained(_load(llama_dir), adapter)
    ours = _delta_weights(peft)
    theirs = _llama_cpp_delta(tmp_path / "a.gguf", llama_dir)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], rtol=1e-5, atol=1e-6)
    import_adapter(tmp_path / "a.gguf", llama_dir, tmp_path / "back")
    again = PeftModel.from_pretrained(_load(llama_dir), tmp_path / "back")
    ids = torch.randint(0, 258, (2, 9))
    with torch.no_grad():
        expected, got = peft(input_ids=ids).logits, again(input_ids=ids).logits
        with peft.disable_adapter():
            plain = peft(input_ids=ids).logits
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapter does change the output
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_llama_qk_permutation_golden_and_inverse(llama_dir: Path) -> None:
    """One head of 4 rows [x0 x1 | x2 x3] (HF: rotary halves) → llama.cpp's interleaved [x0 x2 x1 x3]."""
    layout = read_base_layout(llama_dir)
    rows = torch.arange(32.0).reshape(32, 1)  # q: 4 heads of 8 rows
    permuted = layout.to_gguf_rows("model.layers.0.self_attn.q_proj", rows)
    assert permuted[:8, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    k = layout.to_gguf_rows("model.layers.0.self_attn.k_proj", torch.arange(16.0).reshape(16, 1))  # 2 KV heads
    assert k[8:, 0].tolist() == [8, 12, 9, 13, 10, 14, 11, 15]
    assert torch.equal(layout.from_gguf_rows("model.layers.0.self_attn.q_proj", permuted), rows)
    v = torch.randn(16, 3)
    assert torch.equal(layout.to_gguf_rows("model.layers.0.self_attn.v_proj", v), v)


# ------------------------------------------------------------------------------------------------ merged
def _base_gguf(model_dir: Path, path: Path, embedding_noise: float = 0.0) -> Path:
    """A GGUF model file of the tiny base (F32 weights, llama.cpp names and row order, a few KV pairs):
    what llama.cpp's convert_hf_to_gguf.py would write, minus the tokenizer."""
    layout = read_base_layout(model_dir)
    model = _load(model_dir)
    writer = gguf.GGUFWriter(path, layout.arch_name)
    writer.add_block_count(layout.n_layers)
    writer.add_head_count(layout.n_head)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    for key, value in model.state_dict().items():
        name = layout.name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None or name == "output.weight":
            continue
        value = layout.to_gguf_rows(key.rsplit(".", 1)[0], value)
        if name == "token_embd.weight":
            value = value + embedding_noise * torch.randn_like(value)
        writer.add_tensor(name, value.numpy().astype(np.float32))
    writer.add_tensor("rope_freqs.weight", np.arange(4, dtype=np.float32))  # no HF counterpart: copied as is
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
def test_merged_gguf_holds_the_merged_weights(outtype: str, llama_dir: Path, tmp_path: Path) -> None:
    adapter = _adapter(llama_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=ALL_LLAMA)
    base_gguf = _base_gguf(llama_dir, tmp_path / "base.gguf")
    export_merged(adapter, llama_dir, tmp_path / "merged.gguf", outtype=outtype, base_gguf=base_gguf)
    merged = PeftModel.from_pretrained(_load(llama_dir), adapter).merge_and_unload().state_dict()
    layout = read_base_layout(llama_dir)
    reader = gguf.GGUFReader(tmp_path / "merged.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.file_type"] == {"f32": 0, "q8_0": 7}[outtype]
    assert fields["tokenizer.ggml.tokens"] == ["a", "b", "c"] and fields["llama.block_count"] == 2
    names = {t.name for t in gguf.GGUFReader(base_gguf).tensors}
    assert {t.name for t in reader.tensors} == names
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            assert np.asarray(tensor.data).tolist() == [0, 1, 2, 3]
            continue
        key = next(k for k in merged if layout.name_map.get_name(k, try_suffixes=(".weight",)) == tensor.name)
        got = layout.from_gguf_rows(key.rsplit(".", 1)[0], decode(tensor))
        if outtype == "f32" or got.ndim == 1:
            assert torch.equal(got, merged[key]), tensor.name
        else:
            assert tensor.tensor_type.name == "Q8_0"
            assert float((got - merged[key]).norm() / merged[key].norm()) < 1e-2, tensor.name


def test_merged_refuses_a_gguf_of_another_model(llama_dir: Path, tmp_path: Path) -> None:
    adapter = _adapter(llama_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    other = _base_gguf(llama_dir, tmp_path / "other.gguf", embedding_noise=0.1)
    with pytest.raises(ValueError, match=r"is not the GGUF of --model .*token embeddings differ"):
        export_merged(adapter, llama_dir, tmp_path / "merged.gguf", base_gguf=other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "other.gguf"]


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_export_and_import_round_trip(llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = _adapter(llama_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    out = tmp_path / "a.gguf"
    assert main(["export", "--format", "gguf", str(adapter), "--model", str(llama_dir), "-o", str(out),
                 "--outtype", "F16"]) == 0
    assert "GGUF LoRA adapter written" in capsys.readouterr().out
    assert {t.tensor_type.name for t in gguf.GGUFReader(out).tensors} == {"F16"}
    assert main(["export", str(adapter), "--model", str(llama_dir), "-o", str(out), "--force"]) == 0
    assert main(["import-gguf", str(out), "--model", str(llama_dir), "-o", str(tmp_path / "back")]) == 0
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 8, ["q_proj", "v_proj"])
    assert config["base_model_name_or_path"] == str(llama_dir.resolve())
    # a later import of a partial adapter names full modules where a short name would select too much
    peft = get_peft_model(_load(llama_dir), LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1]))
    randomize_lora(peft)
    peft.save_pretrained(tmp_path / "one_layer")
    assert main(["export", str(tmp_path / "one_layer"), "--model", str(llama_dir), "-o", str(tmp_path / "b.gguf")]) == 0
    assert main(["import-gguf", str(tmp_path / "b.gguf"), "--model", str(llama_dir), "-o", str(tmp_path / "b")]) == 0
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    assert not math.isnan(config["lora_alpha"])
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_import_keeps_llama_cpp_scale_for_mixed_ranks(llama_dir: Path, tmp_path: Path) -> None:
    """An adapter whose pairs have different ranks imports as r (commonest) + rank_pattern, one α."""
    adapter = _adapter(llama_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                       rank_pattern={"v_proj": 2})
    export_adapter(adapter, llama_dir, tmp_path / "a.gguf")
    config = import_adapter(tmp_path / "a.gguf", llama_dir, tmp_path / "back")
    assert config.r == 4 and config.lora_alpha == 8
    assert config.rank_pattern == {"model.layers.0.self_attn.v_proj": 2, "model.layers.1.self_attn.v_proj": 2}
    original = _delta_weights(PeftModel.from_pretrained(_load(llama_dir), adapter))
    restored = _delta_weights(PeftModel.from_pretrained(copy.deepcopy(_load(llama_dir)), tmp_path / "back"))
    for name, delta in original.items():
        assert torch.equal(restored[name], delta), name
